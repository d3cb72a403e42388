"""Poisoning and data loading (SPEC section 1): counts, labels, reproducibility, test sets, .npz checks."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from dataloader_bd import build_datasets, load_npz, make_synthetic, select_poison_indices
from utils.args import DATASETS, build_parser, validate_args
from utils.errors import UserError
from utils.triggers import apply_trigger

C = 10


def attack_args(*flags):
    return validate_args(build_parser("test").parse_args(["--dataset", "synthetic", *map(str, flags)]))


@pytest.fixture(scope="module")
def raw():
    return make_synthetic()


def expected_count(rate, n):
    """floor(p * n) in exact arithmetic (0.1 * 4650 is 465, whatever the float says)."""
    return math.floor(Fraction(str(rate)) * n)


# ----------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("rate", [0.1, 0.05, 0.13, 0.3, 1.0])
@pytest.mark.parametrize("target", [0, 3])
def test_poison_counts_per_target_type(rate, target):
    labels = np.random.default_rng(5).integers(0, C, 4650)   # unbalanced classes
    n_target = int((labels == target).sum())
    expected = {"all2one": expected_count(rate, len(labels) - n_target),
                "all2all": expected_count(rate, len(labels)),
                "cleanLabel": expected_count(rate, n_target)}
    for target_type, n in expected.items():
        idx = select_poison_indices(labels, target_type, target, rate, C, seed=1000)
        assert len(idx) == n, target_type
        assert len(np.unique(idx)) == n and np.all(np.diff(idx) > 0), "sorted, without repeats"
        if target_type == "all2one":
            assert np.all(labels[idx] != target)
        if target_type == "cleanLabel":
            assert np.all(labels[idx] == target)


def test_exact_floor_on_round_products():
    labels = np.ones(4650, dtype=np.int64)   # no sample of class 0: all 4,650 are non-target
    assert len(select_poison_indices(labels, "all2one", 0, 0.1, C, 1)) == 465
    assert len(select_poison_indices(labels[:4649], "all2one", 0, 0.1, C, 1)) == 464


def test_same_seed_same_indices_other_seed_different():
    labels = np.random.default_rng(0).integers(0, C, 3000)
    for target_type in ("all2one", "all2all", "cleanLabel"):
        a = select_poison_indices(labels, target_type, 0, 0.1, C, seed=1000)
        b = select_poison_indices(labels.copy(), target_type, 0, 0.1, C, seed=1000)
        other = select_poison_indices(labels, target_type, 0, 0.1, C, seed=1001)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        assert not np.array_equal(a, other)


# ----------------------------------------------------------------------------------- training set
@pytest.mark.parametrize("target_type,target", [("all2one", 0), ("all2one", 7), ("all2all", 0), ("cleanLabel", 2)])
def test_poisoned_training_set(raw, target_type, target):
    x_train, y_train, _, _ = raw
    args = attack_args("--target_type", target_type, "--target_label", target)
    train, _ = build_datasets(args, raw=raw)
    idx = torch.from_numpy(train.poison_indices)
    assert np.array_equal(train.poison_indices,
                          select_poison_indices(y_train.numpy(), target_type, target, 0.1, C, args.seed))
    # is_clean is False exactly at the poisoned indices
    expected_clean = torch.ones(len(y_train), dtype=torch.bool)
    expected_clean[idx] = False
    assert torch.equal(train.is_clean, expected_clean)
    # labels: t, (y + 1) mod C, or unchanged; gt_labels are always the true classes
    want = {"all2one": torch.full_like(y_train[idx], target), "all2all": (y_train[idx] + 1) % C,
            "cleanLabel": y_train[idx]}[target_type]
    assert torch.equal(train.labels[idx], want)
    assert torch.equal(train.labels[expected_clean], y_train[expected_clean])
    assert torch.equal(train.gt_labels, y_train)
    # images: the trigger on the poisoned ones, the others untouched
    assert torch.equal(train.images[expected_clean], x_train[expected_clean])
    assert torch.equal(train.images[idx], apply_trigger("gridTrigger", x_train[idx], "train"))
    grid = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(train.images[idx][:, :, -3:, -3:], grid.expand(len(idx), 3, 3, 3))
    image, label, gt, clean = train[int(idx[0])]
    assert image.shape == (3, 32, 32) and not clean and gt == y_train[idx[0]] and label == train.labels[idx[0]]


def test_training_set_reproducible_from_seed(raw):
    a, _ = build_datasets(attack_args("--seed", 3), raw=raw)
    b, _ = build_datasets(attack_args("--seed", 3), raw=raw)
    c, _ = build_datasets(attack_args("--seed", 4), raw=raw)
    assert a.poison_indices.tobytes() == b.poison_indices.tobytes()
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not np.array_equal(a.poison_indices, c.poison_indices)


# ----------------------------------------------------------------------------------- test sets
@pytest.mark.parametrize("target_type,target", [("all2one", 0), ("all2one", 4), ("all2all", 0), ("cleanLabel", 2)])
def test_backdoor_test_set(raw, target_type, target):
    _, _, x_test, y_test = raw
    _, tests = build_datasets(attack_args("--target_type", target_type, "--target_label", target), raw=raw)
    assert torch.equal(tests.clean_images, x_test) and torch.equal(tests.clean_labels, y_test)
    keep = torch.ones_like(y_test, dtype=torch.bool) if target_type == "all2all" else y_test != target
    assert len(tests.bd_images) == int(keep.sum()) == len(tests.bd_targets) == len(tests.bd_clean_images)
    if target_type != "all2all":
        assert len(tests.bd_images) < len(x_test), "target-class images are excluded"
    assert torch.equal(tests.bd_clean_images, x_test[keep]), "the untriggered versions"
    assert torch.equal(tests.bd_source, torch.nonzero(keep).flatten()), "ASR0 reads these positions of the clean pass"
    assert torch.equal(tests.bd_gt_labels, y_test[keep])
    assert torch.equal(tests.bd_images, apply_trigger("gridTrigger", x_test[keep], "test"))
    want = (y_test[keep] + 1) % C if target_type == "all2all" else torch.full_like(y_test[keep], target)
    assert torch.equal(tests.bd_targets, want)


def test_clean_run_has_no_poison(raw):
    train, tests = build_datasets(attack_args(), raw=raw, poison=False)
    assert len(train.poison_indices) == 0 and bool(train.is_clean.all())
    assert torch.equal(train.images, raw[0]) and torch.equal(train.labels, raw[1])
    assert len(tests.bd_images) == int((raw[3] != 0).sum())


# ----------------------------------------------------------------------------------- raw data
def test_synthetic_is_deterministic(raw):
    again = make_synthetic()
    for a, b in zip(raw, again):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x_train, y_train, x_test, y_test = raw
    assert x_train.dtype == torch.uint8 and x_train.shape == (2000, 3, 32, 32) and x_test.shape[1:] == (3, 32, 32)
    assert y_train.dtype == torch.int64 and set(y_train.tolist()) == set(range(C))


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good_arrays(n=20, size=32, classes=C):
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "y_train": np.arange(n) % classes,
            "x_test": rng.integers(0, 256, (n // 2, size, size, 3), dtype=np.uint8),
            "y_test": np.arange(n // 2) % classes}


def test_load_npz_reads_hwc_as_chw(tmp_path):
    arrays = _good_arrays()
    x_train, y_train, x_test, y_test = load_npz(_save(tmp_path / "ok.npz", **arrays), DATASETS["cifar10"])
    assert x_train.shape == (20, 3, 32, 32) and x_train.dtype == torch.uint8
    assert torch.equal(x_train, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert y_train.dtype == torch.int64 and torch.equal(y_test, torch.from_numpy(arrays["y_test"]))


@pytest.mark.parametrize("problem", ["missing file", "not an npz", "missing arrays", "float images", "CHW images",
                                     "wrong size", "label out of range", "negative label", "label count"])
def test_load_npz_errors(tmp_path, problem):
    arrays = _good_arrays()
    path = tmp_path / "data.npz"
    if problem == "missing file":
        path = tmp_path / "absent.npz"
    elif problem == "not an npz":
        path.write_text("hello")
    else:
        if problem == "missing arrays":
            del arrays["y_test"]
        elif problem == "float images":
            arrays["x_train"] = arrays["x_train"].astype(np.float32)
        elif problem == "CHW images":
            arrays["x_test"] = np.ascontiguousarray(arrays["x_test"].transpose(0, 3, 1, 2))
        elif problem == "wrong size":
            arrays["x_train"] = arrays["x_train"][:, :28, :28]
        elif problem == "label out of range":
            arrays["y_train"][3] = C
        elif problem == "negative label":
            arrays["y_test"][0] = -1
        elif problem == "label count":
            arrays["y_train"] = arrays["y_train"][:-1]
        _save(path, **arrays)
    with pytest.raises(UserError):
        load_npz(path, DATASETS["cifar10"])


# ----------------------------------------------------------------------------------- real subset
def test_subset_poison_count(subset_path):
    _, y_train, _, _ = load_npz(subset_path, DATASETS["cifar10"])
    assert len(y_train) == 5170
    idx = select_poison_indices(y_train.numpy(), "all2one", 0, 0.1, C, seed=1000)
    assert len(idx) == 464   # floor(0.1 * 4,649 non-target images)
