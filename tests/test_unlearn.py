"""D-BR (SPEC 5.2): ascent unlearns, both checkpoints and the CSV are written, --lr is honoured,
and a split of another attack is refused."""
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_flag_refused, load_script, parse_script_args
from utils import dbr
from utils.checkpoint import read_checkpoint
from utils.errors import UserError
from utils.paths import backdoor_dir, split_dir
from utils.split import load_split
from utils.train import Runtime, generator, train_epoch

CPU = Runtime(torch.device("cpu"))


def test_one_ascent_step_raises_the_loss_on_dp():
    from models import build_model
    torch.manual_seed(0)
    model = build_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=4)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (32,))
    data = SimpleNamespace(images=x, labels=y, gt_labels=y, is_clean=torch.zeros(32, dtype=torch.bool))

    def loss():
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(x.float() / 255), y).item()

    before = loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_epoch(model, data, opt, CPU, generator(0), batch_size=32, ascent=True)
    after_ascent = loss()
    train_epoch(model, data, opt, CPU, generator(0), batch_size=32, ascent=False)
    train_epoch(model, data, opt, CPU, generator(0), batch_size=32, ascent=False)
    assert after_ascent > before
    assert loss() < after_ascent


@pytest.fixture(scope="module")
def victim(sd_chain):
    """A tiny withTrans model beside the shared SD split (conftest.py) (synthetic data, 20 % BadNets)."""
    root = sd_chain[0]
    load_script("train_attack_withTrans").main(
        parse_script_args("train_attack_withTrans", root, "--poison_rate", 0.2, "--epochs", 2, "--lr", 0.05))
    return root


def test_unlearn_relearn_writes_best_last_and_log(victim, monkeypatch):
    module = load_script("unlearn_relearn")
    seen = {}
    real = module.make_optimizer

    def spy(args, params, lr=None):
        seen["lr"] = args.lr
        return real(args, params, lr)

    monkeypatch.setattr(module, "make_optimizer", spy)
    args = parse_script_args("unlearn_relearn", victim, "--poison_rate", 0.2, "--epochs", 3, "--lr", 0.0123)
    result = module.main(args)
    assert seen["lr"] == 0.0123
    folder = backdoor_dir(args, "withTrans")
    log = pd.read_csv(folder / "unlearn_purify.csv")
    assert log["Epoch"].tolist() == [-1, 0, 1, 2]
    assert {"Test_ACC", "Test_ASR", "Test_ASR0", "Test_R-ACC"} <= set(log.columns)
    best, last = read_checkpoint(folder / "1_unlearn_purify.tar"), read_checkpoint(folder / "1_unlearn_purify_last.tar")
    assert last["epoch"] == 2 and last["selection"] == "last epoch"
    scores = log.Test_ACC - log.Test_ASR
    assert best["epoch"] == int(log.Epoch[scores.idxmax()]) == result["best"]["epoch"]
    with pytest.raises(UserError, match="already exists"):
        module.main(parse_script_args("unlearn_relearn", victim, "--poison_rate", 0.2, "--epochs", 1))


def test_split_of_another_attack_is_refused(victim, tmp_path):
    module = load_script("unlearn_relearn")
    other = parse_script_args("unlearn_relearn", victim, "--poison_rate", 0.2, "--epochs", 1, "--seed", 7,
                              "--checkpoint_load",
                              str(backdoor_dir(parse_script_args("unlearn_relearn", victim, "--poison_rate", 0.2),
                                               "withTrans") / "1.tar"))
    with pytest.raises(UserError, match="seed"):
        module.main(other)
    with pytest.raises(UserError, match="no separated samples"):
        module.main(parse_script_args("unlearn_relearn", victim, "--poison_rate", 0.2, "--clean_ratio", 0.3,
                                      "--overwrite"))


def test_holdout_selection_trains_without_the_held_out_samples(victim, tmp_path, monkeypatch, capsys):
    """--select_holdout: a seeded share of D_p and D_c is never trained on, and the saved 'selected'
    epoch is the one with the best held-out D_c accuracy - held-out D_p ASR (no test labels)."""
    module = load_script("unlearn_relearn")
    trained = []
    real = module.train_epoch

    def spy(model, data, *a, **k):
        trained.append(len(data.labels))
        return real(model, data, *a, **k)

    monkeypatch.setattr(module, "train_epoch", spy)
    out = tmp_path / "dbr.tar"
    argv = ("--poison_rate", 0.2, "--epochs", 2, "--select_holdout", 0.25, "--checkpoint_save", out,
            "--log", tmp_path / "dbr.csv")
    args = parse_script_args("unlearn_relearn", victim, *argv)
    split = load_split(split_dir(args), args)
    n_p, n_c = len(split["poison"]["labels"]), len(split["clean"]["labels"])
    result = module.main(args)
    kept_p, kept_c = n_p - round(0.25 * n_p), n_c - round(0.25 * n_c)
    assert trained == [kept_p, kept_c, kept_p, kept_c]      # unlearn on kept D_p, relearn on kept D_c
    log = pd.read_csv(tmp_path / "dbr.csv")
    assert {"Holdout_ACC_Dc", "Holdout_ASR_Dp"} <= set(log.columns)
    scores = log.Holdout_ACC_Dc - log.Holdout_ASR_Dp
    selected = read_checkpoint(tmp_path / "dbr_selected.tar")
    assert selected["epoch"] == int(log.Epoch[scores.idxmax()]) == result["selected"]["epoch"]
    assert "no test labels" in selected["selection"]
    assert_flag_refused(capsys, "unlearn_relearn", victim, "--select_holdout", 1.5, match="--select_holdout")


def _pair(n, poison, seed):
    """``n`` clean and ``n`` poisoned uint8 images (different images), the poisoned made by ``poison``."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    other = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return clean, poison(other.float() / 255).mul(255).round().to(torch.uint8)


def test_estimated_trigger_recovers_a_patch_and_a_blend():
    """estimate_trigger sees a patch as overwritten pixels (mask ~1) and a blend of weight a as mask ~a;
    stamping the estimate on unseen clean images reproduces the real trigger there."""
    patch = torch.zeros(3, 8, 8, dtype=torch.bool)
    patch[:, :2, :2] = True

    def add_patch(x):
        return torch.where(patch, 1.0, x)

    clean, poisoned = _pair(400, add_patch, 0)
    trigger = dbr.estimate_trigger(poisoned, clean)
    mask = trigger[1]
    assert mask[patch].min() > 0.9 and mask[~patch].mean() < 0.1
    fresh = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    stamped = dbr.stamp_trigger(fresh.clone(), trigger)
    assert (stamped[:, patch] - 1).abs().max() < 0.05                  # the patch is there
    assert (stamped - fresh)[:, ~patch].abs().mean() < 0.05            # the rest is (nearly) untouched

    pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    clean, poisoned = _pair(400, lambda x: 0.7 * x + 0.3 * pattern, 3)
    trigger = dbr.estimate_trigger(poisoned, clean)
    assert abs(trigger[1].median().item() - 0.3) < 0.08
    error = (dbr.stamp_trigger(fresh.clone(), trigger) - (0.7 * fresh + 0.3 * pattern)).abs().mean()
    assert error < 0.35 * (fresh - (0.7 * fresh + 0.3 * pattern)).abs().mean()


def test_stamping_touches_the_chosen_share_of_a_batch():
    trigger = (torch.full((3, 8, 8), 0.5), torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))   # add 0.5 everywhere
    x = torch.zeros(1000, 3, 8, 8)
    out = dbr.stamping(None, trigger, 0.3)(x, generator(0))
    touched = (out != 0).flatten(1).any(1)
    assert 250 < touched.sum().item() < 350
    again = dbr.stamping(None, trigger, 0.3)(x, generator(0))
    assert torch.equal(out, again)                                     # seeded
    assert torch.equal(dbr.stamping(None, trigger, 0.0)(x, generator(0)), x)


def test_stamp_and_balance_flags_reach_the_relearning_pass(victim, tmp_path, monkeypatch, capsys):
    """--relearn_stamp and --balance_classes change the relearning pass only (not the ascent), the
    estimated trigger is drawn, and an out-of-range share is refused."""
    module = load_script("unlearn_relearn")
    calls = []
    real = module.train_epoch

    def spy(model, data, *a, **k):
        calls.append(k)
        return real(model, data, *a, **k)

    monkeypatch.setattr(module, "train_epoch", spy)
    out = tmp_path / "new_folder" / "dbr.tar"  # outputs into a folder that does not exist yet
    argv = ("--poison_rate", 0.2, "--epochs", 1, "--checkpoint_save", out, "--log", tmp_path / "dbr.csv")
    module.main(parse_script_args("unlearn_relearn", victim, *argv, "--relearn_stamp", 0.5, "--balance_classes",
                                  "--stamp_source", "dominant_label"))
    unlearn, relearn = calls
    assert unlearn["ascent"] and "criterion" not in unlearn
    assert relearn["augment"] is not unlearn["augment"] and relearn["criterion"] is not None
    assert (tmp_path / "new_folder" / "dbr_trigger_estimate.png").stat().st_size > 1000
    assert_flag_refused(capsys, "unlearn_relearn", victim, "--relearn_stamp", 1.5, match="--relearn_stamp")


def test_balanced_relearning_weights_every_class_the_same():
    from utils.supcon import balanced_class_weights
    from utils.train import cross_entropy
    labels = torch.tensor([0] * 6 + [1] * 2)
    w = balanced_class_weights(labels, 3)
    logits = torch.randn(8, 3)
    loss, _ = cross_entropy(lambda x: x, logits, labels, weight=w)
    per = F.cross_entropy(logits, labels, reduction="none")
    assert torch.isclose(loss, (per[:6].mean() + per[6:].mean()) / 2, atol=1e-6)


def test_stamp_jitter_varies_the_strength_around_the_estimate():
    trigger = (torch.full((3, 8, 8), 0.4), torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))   # add 0.4 everywhere
    x = torch.full((500, 3, 8, 8), 0.2)
    plain = dbr.stamping(None, trigger, 1.0)(x, generator(0))
    assert torch.allclose(plain, torch.full_like(x, 0.6))
    out = dbr.stamping(None, trigger, 1.0, jitter=0.5)(x, generator(0))
    added = out[:, 0, 0, 0] - 0.2                                      # 0.4 k, k in [0.5, 1.5]
    assert added.min() >= 0.2 - 1e-6 and added.max() <= 0.6 + 1e-6
    assert added.std() > 0.05 and abs(added.mean().item() - 0.4) < 0.03
    assert torch.equal(out, dbr.stamping(None, trigger, 1.0, jitter=0.5)(x, generator(0)))


def test_dominant_label_estimate_ignores_clean_images_of_other_labels():
    """With 30 % clean images of other labels in D_p (as FCT lets in), the all-of-D_p estimate
    underrates a blend's weight; --stamp_source dominant_label keeps only the target-labelled part."""
    pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    clean, poisoned = _pair(400, lambda x: 0.7 * x + 0.3 * pattern, 3)
    intruders = clean[:170]  # clean images that landed in D_p, labelled 1..9
    poison_set = torch.cat([poisoned, intruders])
    labels = torch.cat([torch.zeros(400, dtype=torch.long), torch.arange(170) % 9 + 1])
    part, label, share = dbr.dominant_label_part(poison_set, labels)
    assert label == 0 and len(part) == 400 and abs(share - 400 / 570) < 1e-6
    assert torch.equal(part, poisoned)
    everything = dbr.estimate_trigger(poison_set, clean[170:])[1].median().item()
    dominant = dbr.estimate_trigger(part, clean[170:])[1].median().item()
    assert abs(dominant - 0.3) < 0.08 and everything < dominant - 0.1


def test_unlearn_source_dominant_label_ascends_only_on_dp_samples_of_its_most_common_label(victim, tmp_path,
                                                                                          monkeypatch, capsys):
    """--unlearn_source dominant_label: the ascent sees exactly D_p's samples of its most common label."""
    module = load_script("unlearn_relearn")
    seen = []
    real = module.train_epoch

    def spy(model, data, *a, **k):
        seen.append(data.labels.clone())
        return real(model, data, *a, **k)

    monkeypatch.setattr(module, "train_epoch", spy)
    argv = ("--poison_rate", 0.2, "--epochs", 1, "--unlearn_source", "dominant_label",
            "--checkpoint_save", tmp_path / "dbr.tar", "--log", tmp_path / "dbr.csv")
    args = parse_script_args("unlearn_relearn", victim, *argv)
    labels = load_split(split_dir(args), args)["poison"]["labels"]
    label = int(torch.bincount(labels).argmax())
    module.main(args)
    unlearned, relearned = seen
    assert len(unlearned) == int((labels == label).sum()) < len(labels) and set(unlearned.tolist()) == {label}
    assert len(relearned) == len(load_split(split_dir(args), args)["clean"]["labels"])
    assert f"labelled {label}" in capsys.readouterr().out


def test_unlearn_source_dominant_label_with_holdout_holds_out_only_dominant_label_samples(victim, tmp_path,
                                                                                        monkeypatch):
    """--unlearn_source dominant_label with --select_holdout: the held-out D_p, which scores the
    label-free selection, is drawn from the same dominant-label samples as the unlearned D_p."""
    module = load_script("unlearn_relearn")
    built = []
    real = module.dbr.Training

    def spy(*a, **k):
        built.append(real(*a, **k))
        return built[-1]

    monkeypatch.setattr(module.dbr, "Training", spy)
    argv = ("--poison_rate", 0.2, "--epochs", 1, "--unlearn_source", "dominant_label", "--select_holdout", 0.25,
            "--checkpoint_save", tmp_path / "dbr.tar", "--log", tmp_path / "dbr.csv")
    args = parse_script_args("unlearn_relearn", victim, *argv)
    labels = load_split(split_dir(args), args)["poison"]["labels"]
    label = int(torch.bincount(labels).argmax())
    module.main(args)
    sets, n = built[0], int((labels == label).sum())
    held = sets.held["poison"]["labels"]
    assert set(held.tolist()) == {label} and set(sets.poison.labels.tolist()) == {label}
    assert len(held) == round(0.25 * n) and len(held) + len(sets.poison.labels) == n < len(labels)
