"""SD module (SPEC 3): intra-class loss, per-sample tau, FCT metric, thresholds, split and report."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import load_script, parse_script_args
from utils.augment import apply_fct_transform, sample_fct_params
from utils.errors import UserError
from utils.fct import (auroc, fct_values, intra_class_loss, split_by_rank, split_by_threshold, split_report,
                       thresholds)
from utils.paths import backdoor_dir, split_dir
from utils.split import SET_NAMES, load_split
from utils.train import Runtime

CPU = Runtime(torch.device("cpu"))


# ------------------------------------------------------------------ L_intra
def test_intra_loss_zero_for_orthogonal_centres():
    f = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 3.0, 0], [0, 1.0, 0], [0, 0, 5.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    assert intra_class_loss(f, y).item() == pytest.approx(0.0, abs=1e-7)


def test_intra_loss_maximal_when_centres_coincide():
    f = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [0.5, 0.5]])
    y = torch.tensor([0, 1, 2, 2])
    k = 3  # every off-diagonal cosine is 1, the diagonal is zeroed: (K^2 - K) / K^2
    assert intra_class_loss(f, y).item() == pytest.approx((k * k - k) / (k * k), abs=1e-6)


def test_intra_loss_single_class_and_opposite_centres():
    assert intra_class_loss(torch.randn(6, 4), torch.zeros(6, dtype=torch.long)).item() == 0.0
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert intra_class_loss(f, torch.tensor([3, 7])).item() == pytest.approx(-0.5)  # 2 entries of -1 over 4


def test_intra_loss_gradient_pushes_centres_apart():
    f = torch.tensor([[1.0, 0.2], [1.0, -0.1], [0.9, 0.3], [1.0, 0.5]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss = intra_class_loss(f, y)
    loss.backward()
    g = f.detach() - 0.5 * f.grad
    assert intra_class_loss(g, y) < loss


# ------------------------------------------------------------------ tau and Delta
def test_tau_parameters_differ_per_sample_and_are_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_fct_params("rotate", 16, g1, 32)["angle"]
    assert len(torch.unique(a)) == 16 and a.abs().max() <= 180
    assert torch.equal(a, sample_fct_params("rotate", 16, g2, 32)["angle"])
    s = sample_fct_params("affine", 64, torch.Generator().manual_seed(0), 32)["shift"]
    assert torch.equal(s, s.round()) and s.abs().max() <= 0.2 * 32 and len(torch.unique(s, dim=0)) > 20


@pytest.mark.parametrize("name", ["rotate", "affine", "flip", "crop", "blur", "erase"])
def test_tau_transforms_differ_across_a_batch_of_identical_images(name):
    x = torch.rand(1, 3, 32, 32).expand(8, -1, -1, -1).contiguous()
    params = sample_fct_params(name, 8, torch.Generator().manual_seed(1), 32)
    y = apply_fct_transform(name, x, params)
    assert y.shape == x.shape
    distinct = {tuple(v.flatten()[:2000].tolist()) for v in y}
    assert len(distinct) > (1 if name == "flip" else 4)


def _tiny_model():
    from models import build_model
    torch.manual_seed(0)
    return build_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=4).eval()


def test_delta_does_not_depend_on_batch_size_and_follows_the_seed():
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    model = _tiny_model()
    a = fct_values(model, images, CPU, seed=5, batch_size=3)
    b = fct_values(model, images, CPU, seed=5, batch_size=16)
    c = fct_values(model, images, CPU, seed=6, batch_size=16)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert not np.allclose(a, c)
    assert (a >= 0).all()
    assert np.all(fct_values(model, images, CPU, ("none", "none"), seed=5) == 0)
    # opt-in averaging over several tau: draws=1 is the paper's Delta, more draws average it
    np.testing.assert_allclose(fct_values(model, images, CPU, seed=5, batch_size=16, draws=1), b, rtol=1e-6)
    multi = fct_values(model, images, CPU, seed=5, batch_size=7, draws=3)
    assert (multi >= 0).all() and not np.allclose(multi, b)
    np.testing.assert_allclose(multi, fct_values(model, images, CPU, seed=5, batch_size=16, draws=3), rtol=1e-4)


# ------------------------------------------------------------------ gamma and split
def test_thresholds_hand_example():
    values = np.array([5, 1, 4, 2, 3, 0, 9, 8, 7, 6], dtype=float)  # sorted: 0..9
    assert thresholds(values, 0.2, 0.1) == (2.0, 9.0)    # index floor(0.2*10)=2 ; index 10-floor(0.1*10)=9
    assert thresholds(values, 0.25, 0.3) == (2.0, 7.0)   # floor(2.5)=2 ; 10-3=7
    assert thresholds(values, 0.2, 0.0)[1] == math.inf


def test_split_by_rank_partitions_and_breaks_ties_reproducibly():
    values = np.concatenate([np.zeros(50), np.arange(1, 51)])  # half the values tie at 0
    sets, ties = split_by_rank(values, 0.2, 0.05, seed=1)
    assert ties
    assert [len(sets[k]) for k in ("clean", "poison", "suspicious")] == [20, 5, 75]
    allidx = np.concatenate(list(sets.values()))
    assert sorted(allidx.tolist()) == list(range(100))           # nothing lost, nothing repeated
    assert (values[sets["clean"]] == 0).all() and set(values[sets["poison"]]) == {46, 47, 48, 49, 50}
    again, _ = split_by_rank(values, 0.2, 0.05, seed=1)
    other, _ = split_by_rank(values, 0.2, 0.05, seed=2)
    assert np.array_equal(again["clean"], sets["clean"]) and not np.array_equal(other["clean"], sets["clean"])
    _, no_ties = split_by_rank(np.arange(100.0), 0.2, 0.05)
    assert not no_ties


def test_threshold_rule_and_its_tie_problem():
    values = np.concatenate([np.zeros(50), np.arange(1, 51)])
    sets = split_by_threshold(values, 0.0, 46.0)
    assert len(sets["clean"]) == 50 and len(sets["poison"]) == 5  # Delta <= 0 takes all ties
    assert sorted(np.concatenate(list(sets.values())).tolist()) == list(range(100))


def test_auroc_and_report():
    assert auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.1, 0.2], [False, False, True, True]) == 0.0
    assert auroc([1, 1, 1, 1], [False, True, False, True]) == 0.5
    poisoned = np.array([False] * 8 + [True] * 2)
    values = np.arange(10.0)
    sets = {"clean": np.array([0, 1]), "poison": np.array([8, 9, 7]), "suspicious": np.arange(2, 7)}
    r = split_report(sets, poisoned, values)
    assert r["poison_in_clean_set_pct"] == 0 and r["poison_in_poison_set_pct"] == pytest.approx(200 / 3)
    assert r["poison_recall_pct"] == 100 and r["auroc"] == 1.0 and r["n_uncertain_set"] == 5


# ------------------------------------------------------------------ the scripts on a planted trigger
@pytest.fixture
def sd_run(sd_chain):
    """The SD chain shared by all tests (tests/conftest.py): noTrans -> fine-tune -> FCT -> gamma -> split."""
    return sd_chain


def test_fct_ranks_planted_poison_above_clean(sd_run, margin):
    root, args, values, _, report = sd_run
    run = backdoor_dir(args, "noTrans_ftsimi")
    poison = np.loadtxt(run / "0_poison.txt")
    clean = np.loadtxt(run / "0_clean.txt")
    assert len(poison) == 360 and len(clean) == 1640 and len(np.loadtxt(run / "0_all.txt")) == 2000
    # measured (docs/testing.md): AUROC 0.98 with one thread, 0.92 with two (another model: the
    # reductions differ); D_p - D_c purity 97 / 90 points; chance is 0.5 and 0 points
    assert margin("median Delta poisoned / clean", np.median(poison) / max(np.median(clean), 1e-12), "> 1") > 1
    assert margin("AUROC", report["auroc"], "> 0.8") > 0.8
    assert margin("D_p % poisoned - D_c % poisoned",
                  report["poison_in_poison_set_pct"] - report["poison_in_clean_set_pct"], "> 50") > 50


def test_rerun_overwrites_fct_files_instead_of_appending(sd_run):
    root, args, _, _, _ = sd_run
    load_script("calculate_consistency").main(parse_script_args("calculate_consistency", root, "--poison_rate", 0.2))
    assert len(np.loadtxt(backdoor_dir(args, "noTrans_ftsimi") / "0_all.txt")) == 2000


def test_split_files_partition_the_training_set(sd_run):
    root, args, values, gamma, report = sd_run
    folder = split_dir(args)
    assert folder.name == "gridTrigger_0.2_0.05"
    saved = json.loads((folder / "split_report.json").read_text())
    for key in ("n_clean_set", "n_poison_set", "n_uncertain_set", "poison_in_clean_set_pct",
                "poison_in_poison_set_pct", "poison_in_uncertain_set_pct", "poison_recall_pct", "auroc"):
        assert key in saved
    assert (saved["n_clean_set"], saved["n_poison_set"]) == (400, 100)
    split = load_split(folder, args)
    assert saved["clean_set_class_counts"] == np.bincount(split["clean"]["labels"].numpy(), minlength=10).tolist()
    idx = np.concatenate([split[k]["indices"].numpy() for k in SET_NAMES])
    assert sorted(idx.tolist()) == list(range(2000))
    clean_idx = split["clean"]["indices"].numpy()
    assert values[clean_idx].max() <= np.sort(values)[400] + 1e-12   # the split agrees with gamma_c
    assert gamma["gamma_low"] == pytest.approx(np.sort(values)[400])
    assert split["poison"]["images"].dtype == torch.uint8 and split["poison"]["images"].shape[1:] == (3, 32, 32)


def test_split_made_with_another_tau_is_not_replaced_silently(sd_run, tmp_path):
    root, args, _, _, _ = sd_run
    copy = tmp_path / "saved"
    shutil.copytree(root, copy)
    script = load_script("separate_samples")
    folder = split_dir(parse_script_args("separate_samples", copy, "--poison_rate", 0.2))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match="trans1=rotate"):
        script.main(parse_script_args("separate_samples", copy, "--poison_rate", 0.2, "--trans1", "flip"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    script.main(parse_script_args("separate_samples", copy, "--poison_rate", 0.2))   # same settings: a rerun
    script.main(parse_script_args("separate_samples", copy, "--poison_rate", 0.2, "--trans1", "flip", "--overwrite"))
    assert json.loads((folder / "split_meta.json").read_text())["trans1"] == "flip"


def test_split_rule_threshold_applies_gamma_as_thresholds_and_is_not_mixed_with_a_rank_split(sd_run, tmp_path):
    """--split_rule threshold: D_c = every Delta <= gamma_c, D_p = every Delta >= gamma_p (the original
    code's rule, ties included), the same sets as explicit --gamma_low/--gamma_high; a rank split there
    is not replaced by it without --overwrite."""
    root, args, values, gamma, _ = sd_run
    copy = tmp_path / "saved"
    shutil.copytree(root, copy)
    script = load_script("separate_samples")
    flags = ("--poison_rate", 0.2, "--split_rule", "threshold")
    with pytest.raises(UserError, match="made by the rank rule"):
        script.main(parse_script_args("separate_samples", copy, *flags))
    report = script.main(parse_script_args("separate_samples", copy, *flags, "--overwrite"))
    split = load_split(split_dir(parse_script_args("separate_samples", copy, "--poison_rate", 0.2)))
    assert report["rule"] == "threshold"
    assert sorted(split["clean"]["indices"].tolist()) == np.flatnonzero(values <= gamma["gamma_low"]).tolist()
    assert sorted(split["poison"]["indices"].tolist()) == np.flatnonzero(values >= gamma["gamma_high"]).tolist()
    explicit = script.main(parse_script_args("separate_samples", copy, "--poison_rate", 0.2, "--overwrite",
                                             "--gamma_low", gamma["gamma_low"], "--gamma_high", gamma["gamma_high"]))
    assert (explicit["n_clean_set"], explicit["n_poison_set"]) == (report["n_clean_set"], report["n_poison_set"])


def test_split_reads_the_delta_file_of_the_same_model_and_computes_it_for_a_newer_one(sd_run, tmp_path, monkeypatch):
    """SD step 5 takes Delta from calculate_consistency.py's file when that was made from the same
    checkpoint with the same settings; after the model changes it computes Delta again. Same split."""
    import os

    import utils.fct
    from utils.paths import latest_checkpoint
    root, _, _, _, _ = sd_run
    copy = tmp_path / "saved"
    shutil.copytree(root, copy)
    script, calls, real = load_script("separate_samples"), [], utils.fct.fct_values
    monkeypatch.setattr(utils.fct, "fct_values", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = lambda: parse_script_args("separate_samples", copy, "--poison_rate", 0.2, "--overwrite")  # noqa: E731
    folder = split_dir(args())
    assert script.main(args())["fct_seconds"] == 0.0 and calls == []       # read, not computed
    split = {p.name: p.read_bytes() for p in folder.glob("*.npy")}
    os.utime(latest_checkpoint(backdoor_dir(args(), "noTrans_ftsimi")))    # the model is newer than its Delta
    script.main(args())
    assert calls == [1] and {p.name: p.read_bytes() for p in folder.glob("*.npy")} == split


def test_tau_study_reproduces_the_split_of_the_chain_and_writes_nothing(sd_run):
    """benchmarks/tau_study.py with the chain's tau gives the chain's split report; it writes no file."""
    root, args, _, _, report = sd_run
    tau_study = load_script("benchmarks/tau_study")
    before = sorted(root.rglob("*"))
    rows = tau_study.main(parse_script_args("benchmarks/tau_study", root, "--poison_rate", 0.2,
                                            "--taus", "rotate+affine", "flip"))
    assert [r["tau"] for r in rows] == ["rotate + affine", "flip + none"]
    assert rows[0]["D_c % poisoned"] == round(report["poison_in_clean_set_pct"], 2)
    assert rows[0]["D_p % poisoned"] == round(report["poison_in_poison_set_pct"], 2)
    assert rows[0]["AUROC"] == round(report["auroc"], 4)
    assert sorted(root.rglob("*")) == before
    with pytest.raises(UserError, match="not TRANS1"):
        tau_study.parse_tau("rotate+spin")


def test_fct_plot_counts_the_zeros_and_keeps_a_small_poison_set_visible():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.plots import plot_fct
    rng = np.random.default_rng(0)
    clean = np.concatenate([np.zeros(4000), rng.gamma(2, 0.01, 500)])   # a collapsed model: most Delta = 0
    poison = 10 + rng.random(45)
    fig, ax = plt.subplots()
    plot_fct(ax, clean, poison, "collapsed")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert any("4,000 clean, 0 poisoned" in t.get_text() for t in ax.texts)
    plt.close(fig)


def test_sd_model_notrans_measures_delta_with_the_newest_notrans_model_and_the_split_records_it(sd_run, tmp_path):
    """--sd_model noTrans (opt-in): SD steps 3-5 use the newest noTrans checkpoint instead of the
    fine-tuned one; a split made from the other model is not replaced without --overwrite."""
    from utils.fct import fct_checkpoint
    from utils.paths import latest_checkpoint
    root, _, _, _, _ = sd_run
    copy = tmp_path / "saved"
    shutil.copytree(root, copy)
    flags = ("--poison_rate", 0.2, "--sd_model", "noTrans")
    args = parse_script_args("calculate_consistency", copy, *flags)
    no_trans = latest_checkpoint(backdoor_dir(args, "noTrans"))
    assert str(fct_checkpoint(args)) == str(no_trans) and no_trans.stem == "8"     # 9 noTrans epochs
    assert str(fct_checkpoint(parse_script_args("calculate_consistency", copy, "--poison_rate", 0.2))) == \
        str(latest_checkpoint(backdoor_dir(args, "noTrans_ftsimi")))             # the paper's default
    values = load_script("calculate_consistency").main(args)
    assert np.array_equal(np.load(no_trans.parent / "8_fct.npy"), values) and len(values) == 2000
    split = load_script("separate_samples")
    folder = split_dir(args)
    with pytest.raises(UserError, match="sd_model"):
        split.main(parse_script_args("separate_samples", copy, *flags))
    report = split.main(parse_script_args("separate_samples", copy, *flags, "--overwrite"))
    assert report["fct_seconds"] == 0.0                                              # read from the noTrans Delta file
    assert json.loads((folder / "split_meta.json").read_text())["sd_model"] == "noTrans"
    # no noTrans model yet: one line naming the step that makes it
    with pytest.raises(UserError, match="train_attack_noTrans.py"):
        fct_checkpoint(parse_script_args("calculate_consistency", tmp_path / "empty", *flags))
