"""D-ST (ST/): the semi-supervised contrastive loss, the mixed cross-entropy, checkpoints, and a
tiny end-to-end run (extractor, classifier, test) on the synthetic dataset."""
import csv
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import COMPILE, assert_flag_refused
from dataloader_bd import build_datasets
from utils.args import describe_args, use_compile, validate_args
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.paths import REPO_ROOT, split_dir
from utils.split import save_split
from utils.st import EXTRACTOR_KIND, load_extractor, prepare_args
from utils.supcon import (BASE_TEMPERATURE, SupConNet, build_encoder, mixed_cross_entropy, positive_mask,
                          semi_supcon_loss)
from utils.train import warmup_cosine_lr

T = 0.1


def _script(name):
    spec = importlib.util.spec_from_file_location(f"st_{name}", REPO_ROOT / "ST" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _features(b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, 2, d, generator=g), dim=2)


# ----------------------------------------------------------------------------- independent references
def supcon_reference(features, labels, temperature):
    """SupCon (Khosla et al. 2020, L_out) written anchor by anchor."""
    b, v, _ = features.shape
    z = [features[i, k] for k in range(v) for i in range(b)]
    y = [int(labels[i]) for k in range(v) for i in range(b)]
    total = 0.0
    for i in range(len(z)):
        denom = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(len(z)) if a != i)
        pos = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        total += -sum(float(z[i] @ z[p]) / temperature - math.log(denom) for p in pos) / len(pos)
    return (temperature / BASE_TEMPERATURE) * total / len(z)


def ntxent_reference(features, temperature):
    """SimCLR's NT-Xent: each view's partner is the only positive, all other views are negatives."""
    b = features.shape[0]
    z = torch.cat([features[:, 0], features[:, 1]])
    sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(b) + b, torch.arange(b)])
    return (temperature / BASE_TEMPERATURE) * F.cross_entropy(sim, partner).item()


# ----------------------------------------------------------------------------- the contrastive loss
def test_loss_is_supcon_when_every_sample_is_trusted():
    f, y = _features(), torch.tensor([0, 1, 0, 2, 1, 0])
    loss = semi_supcon_loss(f, y, torch.ones(6, dtype=torch.bool), T)
    assert loss.item() == pytest.approx(supcon_reference(f, y, T), rel=1e-5)


def test_loss_is_simclr_when_no_sample_is_trusted():
    f, y = _features(seed=1), torch.tensor([0, 1, 0, 2, 1, 0])
    loss = semi_supcon_loss(f, y, torch.zeros(6, dtype=torch.bool), T)
    assert loss.item() == pytest.approx(ntxent_reference(f, T), rel=1e-5)


def test_untrusted_anchor_has_only_its_own_view_and_trusted_anchor_ignores_untrusted():
    y = torch.tensor([0, 0, 0, 1])
    trusted = torch.tensor([True, True, False, True])  # sample 2 is in D_p: same label as 0 and 1
    pos = positive_mask(y, trusted)                     # views 0..3 then 4..7
    assert pos[2].nonzero().flatten().tolist() == [6]   # D_p anchor: only its other view
    assert pos[0].nonzero().flatten().tolist() == [1, 4, 5]  # D_c anchor: D_c same-label views, never 2 or 6
    trusted_rows = trusted.repeat(2)
    assert not pos[trusted_rows][:, [2, 6]].any()      # no D_c anchor ever has a view of sample 2
    # behaviour: the labels of untrusted samples cannot change the loss
    f = _features(b=4, seed=2)
    a = semi_supcon_loss(f, y, trusted, T)
    b = semi_supcon_loss(f, torch.tensor([0, 0, 1, 1]), trusted, T)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_schedule_warms_up_then_reaches_the_floor():
    assert warmup_cosine_lr(0, 200, 0.5) == pytest.approx(0.01)
    assert warmup_cosine_lr(10, 200, 0.5) == pytest.approx(0.5)
    assert warmup_cosine_lr(200, 200, 0.5) == pytest.approx(0.5 * 0.001)


# ----------------------------------------------------------------------------- the mixed cross-entropy
def test_mixed_loss_pushes_poison_predictions_away_and_is_finite_without_poison():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g, requires_grad=True)
    labels = torch.tensor([1, 2, 3, 4, 0, 0, 0, 0])
    in_p = torch.tensor([False] * 4 + [True] * 4)
    loss = mixed_cross_entropy(logits, labels, in_p, lam=0.5)
    loss.backward()
    step = logits - 1.0 * logits.grad
    p_before = logits.softmax(1)[torch.arange(8), labels]
    p_after = step.softmax(1)[torch.arange(8), labels]
    assert (p_after[in_p] < p_before[in_p]).all() and (p_after[~in_p] > p_before[~in_p]).all()
    for mask in (torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool)):
        x = torch.randn(8, 10, requires_grad=True)
        out = mixed_cross_entropy(x, labels, mask, 0.001)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert mixed_cross_entropy(logits, labels, torch.zeros(8, dtype=torch.bool)).item() == pytest.approx(
        F.cross_entropy(logits, labels).item())


def test_balanced_weights_give_every_present_class_the_same_total_weight():
    from utils.supcon import balanced_class_weights
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    w = balanced_class_weights(labels, 4)
    per_class = torch.zeros(4).index_add_(0, labels, w[labels])
    assert torch.allclose(per_class[:3], per_class[0].expand(3)) and w[3] == 0
    logits = torch.randn(7, 4)
    in_p = torch.zeros(7, dtype=torch.bool)
    manual = (F.cross_entropy(logits, labels, reduction="none") * w[labels]).sum() / w[labels].sum()
    assert mixed_cross_entropy(logits, labels, in_p, class_weight=w).item() == pytest.approx(manual.item())


# ----------------------------------------------------------------------------- scripts on synthetic data
def _args(parser_module, tmp_path, *extra):
    common = ["--dataset", "synthetic", "--width", "4", "--device", "cpu", "--save_root", str(tmp_path / "saved"),
              "--st_root", str(tmp_path / "st"), "--compile", COMPILE]
    return parser_module.build_parser().parse_args(common + list(extra))


def _oracle_split(args, n=200):
    """A split from the ground truth over the first n training samples: 100 clean in D_c, D_p = the
    poisoned ones among them and 5 clean ones (mostly poisoned), the rest D_u."""
    train, _ = build_datasets(args)
    idx = np.arange(n)
    poisoned = idx[~train.is_clean.numpy()[:n]]
    clean = idx[train.is_clean.numpy()[:n]]
    sets = {"clean": clean[:100], "poison": np.concatenate([poisoned[:25], clean[100:105]])}
    sets["suspicious"] = np.setdiff1d(idx, np.concatenate(list(sets.values())))
    meta = describe_args(args)
    meta["data_tag"] = "synthetic"
    save_split(split_dir(args), train, sets, {}, meta)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("st")
    ext = _script("train_extractor")
    args = _args(ext, tmp, "--epochs", "2", "--batch_size", "128", "--save_freq", "1")
    _oracle_split(validate_args(args))
    model = ext.main(args)
    return tmp, args, model


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_extractor_writes_checkpoints_and_log(trained):
    tmp, args, _ = trained
    from utils.st import extractor_dir
    run = extractor_dir(args)
    assert run.name == "SupCon_synthetic_resnet18_lr_0.5_decay_0.0001_bsz_128_temp_0.1_trial_0_cosine_warm"
    assert {p.name for p in run.glob("*.pth")} == {"ckpt_epoch_1.pth", "ckpt_epoch_2.pth", "last.pth"}
    rows = _rows(run / "log.csv")
    assert len(rows) == 2 and all(math.isfinite(float(r["Train_Loss"])) for r in rows)


def test_checkpoint_reloads_to_identical_outputs(trained):
    _, args, model = trained
    from utils.st import extractor_dir
    reloaded, _ = load_extractor(extractor_dir(args) / "last.pth", args)
    reloaded = reloaded.to(memory_format=torch.channels_last)  # as trained: same kernels, same bits
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x)) and torch.equal(model.features(x), reloaded.features(x))


def test_same_seed_same_loss(tmp_path):
    ext = _script("train_extractor")
    losses = []
    for run in ("a", "b"):
        args = _args(ext, tmp_path / run, "--epochs", "1", "--batch_size", "128")
        _oracle_split(validate_args(args), n=160)
        ext.main(args)
        from utils.st import extractor_dir
        losses.append(_rows(extractor_dir(args) / "log.csv")[0]["Train_Loss"])
    assert losses[0] == losses[1]


@pytest.mark.skipif(use_compile(SimpleNamespace(compile="auto"), torch.device("cpu"), extractor=True) is False,
                    reason="no C++ compiler: TorchInductor cannot build CPU kernels here")
def test_compiled_extractor_follows_the_plain_loss_curve_and_saves_a_plain_checkpoint(tmp_path):
    """--compile on against --compile off: the same seed gives the same loss curve within float noise
    (4 steps of one batch shape), and the compiled run's checkpoint loads into the plain network."""
    from torch._dynamo.utils import counters
    from utils.st import extractor_dir
    ext, curves = _script("train_extractor"), {}
    for mode in ("off", "on"):
        args = _args(ext, tmp_path / mode, "--epochs", "2", "--batch_size", "100", "--compile", mode)
        _oracle_split(validate_args(args), n=200)
        counters.clear()
        ext.main(args)
        assert (counters["stats"]["unique_graphs"] > 0) == (mode == "on")
        curves[mode] = [float(r["Train_Loss"]) for r in _rows(extractor_dir(args) / "log.csv")]
        state = torch.load(extractor_dir(args) / "last.pth", weights_only=False)["model"]
        assert not any("_orig_mod" in k for k in state)
        load_extractor(extractor_dir(args) / "last.pth", args)  # strict load into the plain SupConNet
    assert curves["on"] == pytest.approx(curves["off"], rel=1e-2), curves


def test_classifier_and_test_script_run_and_write_files(trained):
    tmp, ext_args, _ = trained
    from utils.st import extractor_dir
    cls = _script("train_classifier")
    args = _args(cls, tmp, "--epochs", "1", "--batch_size", "64", "--ckpt", str(extractor_dir(ext_args) / "last.pth"))
    model, metrics = cls.main(args)
    run = Path(tmp / "st").glob("**/Linear_synthetic_resnet18_lr_5.0_decay_0_bsz_64")
    run = next(run)
    assert (run / "last.pth").exists() and (run / "ckpt_epoch_0.pth").exists()
    assert set(_rows(run / "log.csv")[0]) >= {"Test_ACC", "Test_ASR", "Test_ASR0", "Test_R-ACC"}
    tst = _script("test")
    row = tst.main(_args(tst, tmp, "--batch_size", "64"))
    assert row["Test_ACC"] == pytest.approx(metrics["Test_ACC"])
    assert row["Test_ASR0"] == pytest.approx(metrics["Test_ASR0"])
    assert len(_rows(run.parent / "test.csv")) == 1
    # a checkpoint that does not load fully is refused with a one-line error
    bad = SupConNet(build_encoder(describe_args(ext_args)))
    state = {k: v for k, v in bad.state_dict().items() if not k.startswith("head.2")}
    torch.save({"model": state, "args": describe_args(ext_args), "kind": EXTRACTOR_KIND, "epoch": 0}, tmp / "bad.pth")
    with pytest.raises(UserError):
        tst.main(_args(tst, tmp, "--batch_size", "64", "--model_ckpt", str(tmp / "bad.pth")))
    with pytest.raises(UserError):  # a classifier is not an extractor
        tst.main(_args(tst, tmp, "--batch_size", "64", "--model_ckpt", str(run / "last.pth")))


def test_extractor_refuses_to_overwrite_and_time_budget_sets_epochs(trained, tmp_path):
    tmp, _, _ = trained
    ext = _script("train_extractor")
    with pytest.raises(UserError):
        ext.main(_args(ext, tmp, "--epochs", "2", "--batch_size", "128"))
    args = _args(ext, tmp_path, "--epochs", "50", "--batch_size", "128", "--time_budget", "0.0001")
    _oracle_split(validate_args(args), n=160)
    ext.main(args)
    assert args.epochs == 1


def test_undefended_uses_every_sample_trusted(tmp_path):
    from utils.st import load_st_sets
    from utils.train import Runtime
    ext = _script("train_extractor")
    args = prepare_args(_args(ext, tmp_path, "--undefended"))
    data, _, _ = load_st_sets(args, Runtime(torch.device("cpu")))
    train, _ = build_datasets(args)
    assert len(data.labels) == len(train) and data.trusted.all() and not data.in_poison_set.any()
    assert "undefended" in str(ext.extractor_dir(args))


def test_save_root_is_taken_from_the_repo_root_inside_st(tmp_path, monkeypatch):
    ext = _script("train_extractor")
    monkeypatch.chdir(REPO_ROOT / "ST")
    args = prepare_args(ext.build_parser().parse_args(["--dataset", "synthetic"]))
    assert Path(args.save_root) == REPO_ROOT / "saved"
    monkeypatch.chdir(tmp_path)
    args = prepare_args(ext.build_parser().parse_args(["--dataset", "synthetic"]))
    assert args.save_root == "./saved"


def test_extractor_checkpoint_of_another_width_is_refused(trained, tmp_path):
    _, args, model = trained
    path = tmp_path / "w.pth"
    save_checkpoint(path, args, model, kind=EXTRACTOR_KIND)
    other = _script("train_extractor").build_parser().parse_args(
        ["--dataset", "synthetic", "--width", "8", "--save_root", str(tmp_path)])
    with pytest.raises(UserError):
        load_extractor(path, validate_args(other))


def test_negative_lambda_is_refused(tmp_path, capsys):
    assert_flag_refused(capsys, "ST/train_classifier", tmp_path, "--lambda_p", "-0.001", match="--lambda_p")
    cls = _script("train_classifier")
    args = cls.build_parser().parse_args(["--dataset", "synthetic", "--lambda_p", "0"])
    assert prepare_args(args).lambda_p == 0  # 0 is allowed: the plain-CE ablation


def test_extractor_resumed_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    ext = _script("train_extractor")
    flags = ("--epochs", "3", "--batch_size", "128", "--warm_epochs", "1")
    whole = _args(ext, tmp_path / "whole", *flags)
    _oracle_split(validate_args(whole))
    ext.main(whole)
    real = ext.save

    def stop_at_epoch_1(args, run_dir, model, optimizer, epoch, g):
        if epoch == 1:  # after epoch 1's CSV row, before its checkpoint
            raise KeyboardInterrupt
        real(args, run_dir, model, optimizer, epoch, g)
    monkeypatch.setattr(ext, "save", stop_at_epoch_1)
    cut = _args(ext, tmp_path / "cut", *flags)
    _oracle_split(validate_args(cut))
    with pytest.raises(KeyboardInterrupt):
        ext.main(cut)
    monkeypatch.setattr(ext, "save", real)
    ext.main(_args(ext, tmp_path / "cut", *flags, "--resume"))
    from utils.checkpoint import read_checkpoint
    from utils.st import extractor_dir
    a, b = (read_checkpoint(extractor_dir(x) / "last.pth") for x in (whole, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["Epoch"] for r in _rows(extractor_dir(cut) / "log.csv")] == ["0", "1", "2"]
