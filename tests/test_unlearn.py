"""D-BR (SPEC 5.2): ascent unlearns, both checkpoints and the CSV are written, --lr is honoured,
and a split of another attack is refused."""
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, parse_script_args
from utils.checkpoint import read_checkpoint
from utils.errors import UserError
from utils.paths import backdoor_dir
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
    """A tiny withTrans model beside the session's SD split (synthetic data, 20 % BadNets)."""
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


def test_holdout_selection_trains_without_the_held_out_samples(victim, tmp_path, monkeypatch):
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
    split = module.load_split(module.split_dir(args), args)
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
    with pytest.raises(UserError, match="select_holdout"):
        module.main(parse_script_args("unlearn_relearn", victim, *argv[:4], "--select_holdout", 1.5, "--overwrite"))
