"""A tiny noTrans run on synthetic data (SPEC 3.1): it learns the backdoor, writes its outputs where
utils.paths says, refuses to overwrite them silently, resumes, and checks checkpoints it is given."""
import math
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import load_script, parse_script_args
from dataloader_bd import make_synthetic, select_poison_indices
from models import get_network
from utils.args import validate_args
from utils.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.paths import backdoor_dir
from utils.train import evaluate, load_attack_data, make_runtime

SCRIPT = "train_attack_noTrans"
# Measured (1 thread): with 20 % poisoning and lr 0.05 the width-8 net picks up the grid trigger on
# the synthetic set at epoch 6 (ASR 100, ASR0 0 from epoch 7 on, ACC 98-100); 9 epochs leave a margin.
RUN = ("--epochs", 9, "--lr", 0.05, "--poison_rate", 0.2)
LR, EPOCHS = 0.05, 9


def snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 9-epoch run shared by the tests of this module (they only read it or copy it)."""
    root = tmp_path_factory.mktemp("run") / "saved"
    args = parse_script_args(SCRIPT, root, *RUN)
    load_script(SCRIPT).main(args)
    return root, backdoor_dir(args, "noTrans")


def test_run_folder_and_outputs(trained):
    root, run_dir = trained
    assert run_dir == (root / "backdoored_model" / "poison_rate_0.2" / "noTrans" / "synthetic" / "resnet18_w8"
                       / "gridTrigger")
    assert sorted(p.name for p in run_dir.glob("*.tar")) == [f"{e}.tar" for e in range(EPOCHS)]
    assert not list(run_dir.glob("*.tmp"))
    _, y_train, _, _ = make_synthetic()
    saved = np.load(run_dir / "poison_indices.npy", allow_pickle=False)
    assert np.array_equal(saved, select_poison_indices(y_train.numpy(), "all2one", 0, 0.2, 10, 1000))
    assert len(saved) == 360   # floor(0.2 * 1,800 non-target samples)
    ckpt = read_checkpoint(run_dir / f"{EPOCHS - 1}.tar")
    assert ckpt["epoch"] == EPOCHS - 1
    assert {k: ckpt["args"][k] for k in ("dataset", "model", "width", "trigger_type", "poison_rate")} == \
        {"dataset": "synthetic", "model": "resnet18", "width": 8, "trigger_type": "gridTrigger", "poison_rate": 0.2}
    assert {"model", "optimizer", "scheduler"} <= set(ckpt)


def test_own_trigger_asset_gets_its_own_folder(tmp_path):
    """A run with its own blend image or SSBA encoder never shares the committed asset's folder."""
    folder = lambda *flags: backdoor_dir(parse_script_args(SCRIPT, tmp_path, *flags), "noTrans").name  # noqa: E731
    assert folder("--trigger_type", "kittyTrigger") == "kittyTrigger"
    assert folder("--trigger_type", "kittyTrigger", "--blend_image", "imgs/my_cat.png") == "kittyTrigger_img-my_cat"
    assert folder("--trigger_type", "SSBA", "--ssba_encoder", "enc/v2.pt") == "SSBA_enc-v2"
    assert folder("--trigger_type", "gridTrigger", "--blend_image", "imgs/my_cat.png") == "gridTrigger"  # unused


def test_learns_the_backdoor(trained, margin):
    _, run_dir = trained
    log = pd.read_csv(run_dir / "log.csv")
    assert log["Epoch"].tolist() == list(range(EPOCHS))
    last = log.iloc[-1]
    for name, value, bound in (("ASR", last["Test_ASR"], "> 90"), ("ASR0", last["Test_ASR0"], "< 20"),
                               ("ACC", last["Test_ACC"], "> 90"), ("Train_ASR", last["Train_ASR"], "> 80")):
        margin(name, value, bound)
    assert last["Test_ASR"] > 90, log.to_string()
    assert last["Test_ASR0"] < 20, "the model predicts the target because of the trigger, not by default"
    assert last["Test_ACC"] > 90
    assert last["Train_ASR"] > 80
    # the CSV keeps 4 decimals (utils/logger.py)
    assert np.allclose(log["LR"], [LR * 0.5 * (1 + math.cos(math.pi * e / 100)) for e in range(EPOCHS)], atol=1e-4)


def test_checkpoint_reproduces_the_logged_metrics(trained):
    root, run_dir = trained
    model, _ = model_from_checkpoint(run_dir / f"{EPOCHS - 1}.tar")
    args = validate_args(parse_script_args(SCRIPT, root, *RUN))
    rt = make_runtime(args, torch.device("cpu"))  # the precision the run logged with (bf16 inference on AMX)
    _, tests = load_attack_data(args, rt)
    metrics = evaluate(model, tests, rt, target_label=0)
    last = pd.read_csv(run_dir / "log.csv").iloc[-1]
    for key in ("Test_ACC", "Test_ASR", "Test_ASR0", "Test_R-ACC"):
        assert metrics[key] == pytest.approx(last[key], abs=1e-3), key


def test_rerun_refuses_and_leaves_files_alone(trained):
    root, run_dir = trained
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="--resume"):
        load_script(SCRIPT).main(parse_script_args(SCRIPT, root, *RUN))
    assert snapshot(run_dir) == before


def test_resume_continues_at_the_next_epoch(trained, tmp_path, margin):
    root, run_dir = trained
    copy = tmp_path / "saved"
    shutil.copytree(root, copy)
    args = parse_script_args(SCRIPT, copy, "--epochs", EPOCHS + 1, "--lr", LR, "--poison_rate", 0.2, "--resume")
    load_script(SCRIPT).main(args)
    new_dir = backdoor_dir(args, "noTrans")
    old_log, new_log = pd.read_csv(run_dir / "log.csv"), pd.read_csv(new_dir / "log.csv")
    assert new_log["Epoch"].tolist() == list(range(EPOCHS + 1))
    pd.testing.assert_frame_equal(new_log.iloc[:EPOCHS], old_log)
    assert read_checkpoint(new_dir / f"{EPOCHS}.tar")["epoch"] == EPOCHS
    # the optimiser and schedule state came back: the lr continues the cosine curve
    assert new_log["LR"].iloc[-1] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * EPOCHS / 100)), abs=1e-4)
    assert margin("ASR after the resumed epoch", new_log["Test_ASR"].iloc[-1], "> 90") > 90


def test_overwrite_starts_again(trained, tmp_path):
    root, _ = trained
    copy = tmp_path / "saved"
    shutil.copytree(root, copy)
    args = parse_script_args(SCRIPT, copy, "--epochs", 1, "--lr", LR, "--poison_rate", 0.2, "--overwrite")
    load_script(SCRIPT).main(args)
    run_dir = backdoor_dir(args, "noTrans")
    assert sorted(p.name for p in run_dir.glob("*.tar")) == ["0.tar"]
    assert pd.read_csv(run_dir / "log.csv")["Epoch"].tolist() == [0]


def test_resume_without_checkpoint_is_a_user_error(save_root):
    with pytest.raises(UserError, match="no checkpoint"):
        load_script(SCRIPT).main(parse_script_args(SCRIPT, save_root, "--epochs", 1, "--resume"))
    assert not save_root.exists()


@pytest.mark.parametrize("other", [("--width", 4), ("--dataset", "cifar10"), ("--trigger_type", "squareTrigger")])
def test_checkpoint_from_another_run_is_refused_before_writing(tmp_path, save_root, other):
    foreign_args = validate_args(parse_script_args(SCRIPT, tmp_path / "elsewhere", *other))
    foreign = tmp_path / "foreign.tar"
    save_checkpoint(foreign, foreign_args, get_network(foreign_args), epoch=0)
    args = parse_script_args(SCRIPT, save_root, "--epochs", 1, "--checkpoint_load", foreign)
    with pytest.raises(UserError, match=other[0]):
        load_script(SCRIPT).main(args)
    assert not save_root.exists(), "nothing written"


def test_checkpoint_made_with_another_trigger_file_is_refused(tmp_path, save_root):
    """The blend image is fingerprinted: after it changes, its old checkpoint is not silently reused."""
    from PIL import Image
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    flags = ("--trigger_type", "kittyTrigger", "--blend_image", image)
    old_args = validate_args(parse_script_args(SCRIPT, tmp_path / "elsewhere", *flags))
    old = tmp_path / "old.tar"
    save_checkpoint(old, old_args, get_network(old_args), epoch=0)
    assert len(read_checkpoint(old)["args"]["trigger_asset"]) == 12
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(image)  # the user redraws the image in place
    args = parse_script_args(SCRIPT, save_root, "--epochs", 1, "--checkpoint_load", old, *flags)
    with pytest.raises(UserError, match="another trigger file"):
        load_script(SCRIPT).main(args)
    assert not save_root.exists(), "nothing written"


def test_inference_precision_is_separate_from_training_precision():
    """--amp auto trains in fp32 on a CPU (except the D-ST extractor where bf16 is native); forward-only
    passes use bf16 only where the CPU runs it natively; --amp off keeps everything fp32 and --amp on makes everything bf16."""
    from utils.args import cpu_has_native_bf16, use_amp, use_inference_amp
    cpu = torch.device("cpu")
    modes = {m: types.SimpleNamespace(amp=m) for m in ("auto", "on", "off")}
    assert not use_amp(modes["auto"], cpu) and use_inference_amp(modes["auto"], cpu) == cpu_has_native_bf16()
    assert use_amp(modes["on"], cpu) and use_inference_amp(modes["on"], cpu)
    assert not use_amp(modes["off"], cpu) and not use_inference_amp(modes["off"], cpu)
    # the D-ST extractor (native_cpu=True) also trains in bf16 with auto, but only where bf16 is native
    assert use_amp(modes["auto"], cpu, native_cpu=True) == cpu_has_native_bf16()
    assert not use_amp(modes["off"], cpu, native_cpu=True)
    rt = make_runtime(modes["off"], cpu)
    rt.inference_amp = True
    layer = torch.nn.Linear(4, 2)
    with rt.autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    with rt.autocast(inference=True):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16


def test_compile_auto_is_on_for_the_extractor_on_a_cpu_with_a_compiler_only(monkeypatch):
    """--compile auto compiles the D-ST extractor on a CPU (not the classifiers, not CUDA); --compile on
    everywhere; on a CPU without a C++ compiler auto stays eager and on is a one-line error."""
    from utils import args as shared
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    modes = {m: types.SimpleNamespace(compile=m) for m in ("auto", "on", "off")}
    monkeypatch.setattr(shared, "_cxx_compiler", lambda: "/usr/bin/g++")
    assert shared.use_compile(modes["auto"], cpu, extractor=True)
    assert not shared.use_compile(modes["auto"], cpu) and not shared.use_compile(modes["auto"], cuda, extractor=True)
    assert shared.use_compile(modes["on"], cpu) and shared.use_compile(modes["on"], cuda)
    assert not shared.use_compile(modes["off"], cpu, extractor=True)
    assert make_runtime(types.SimpleNamespace(amp="off", compile="auto"), cpu, extractor=True).compile
    monkeypatch.setattr(shared, "_cxx_compiler", lambda: None)
    assert not shared.use_compile(modes["auto"], cpu, extractor=True)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        shared.use_compile(modes["on"], cpu)
    assert shared.use_compile(modes["on"], cuda)  # CUDA kernels come from Triton, not a host compiler


class Interrupted(Exception):
    """Stands for a kill at one exact point of a run."""


def test_interruption_between_log_row_and_checkpoint_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Stopped after epoch 2's CSV row but before its checkpoint, then resumed: every epoch is in the
    log once, and the model is the one an uninterrupted run gives (random state from the checkpoint)."""
    import utils.train
    script, flags = "train_attack_withTrans", ("--epochs", 4, "--lr", 0.05, "--schedule", 2)  # augmentation draws from g
    load_script(script).main(parse_script_args(script, tmp_path / "whole", *flags))
    real = utils.train.save_checkpoint

    def save_until_epoch_2(path, *a, **k):
        if path.name == "2.tar":
            raise Interrupted
        return real(path, *a, **k)
    monkeypatch.setattr(utils.train, "save_checkpoint", save_until_epoch_2)
    args = parse_script_args(script, tmp_path / "cut", *flags)
    with pytest.raises(Interrupted):
        load_script(script).main(args)
    run_dir = backdoor_dir(args, "withTrans")
    assert pd.read_csv(run_dir / "log.csv")["Epoch"].tolist() == [0, 1, 2]   # the row of epoch 2 has no checkpoint
    monkeypatch.setattr(utils.train, "save_checkpoint", real)
    load_script(script).main(parse_script_args(script, tmp_path / "cut", *flags, "--resume"))
    log = pd.read_csv(run_dir / "log.csv")
    whole_dir = backdoor_dir(parse_script_args(script, tmp_path / "whole", *flags), "withTrans")
    whole_log = pd.read_csv(whole_dir / "log.csv")
    assert log["Epoch"].tolist() == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(log.drop(columns="Seconds"), whole_log.drop(columns="Seconds"))
    resumed, whole = read_checkpoint(run_dir / "3.tar"), read_checkpoint(whole_dir / "3.tar")
    assert all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])


def test_checkpoint_without_random_state_is_not_resumed(tmp_path):
    args = parse_script_args(SCRIPT, tmp_path / "saved", "--epochs", 2)
    run_dir = backdoor_dir(validate_args(args), "noTrans")
    save_checkpoint(run_dir / "0.tar", args, get_network(args), epoch=0)
    with pytest.raises(UserError, match="no random state"):
        load_script(SCRIPT).main(parse_script_args(SCRIPT, tmp_path / "saved", "--epochs", 2, "--resume"))


def test_sgd_epoch_sets_the_per_step_lr_sums_stats_and_ascends():
    """The one loop: lr_at is applied before every step, per-batch stats add up exactly, the loss is
    the sample-weighted mean, and ascent=True steps against the gradient."""
    from utils.train import generator, sgd_epoch
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    init = torch.nn.Linear(3, 2).state_dict()

    def run(n, batch_size, ascent=False, lr_at=None):
        model = torch.nn.Linear(3, 2)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen, losses = [], []

        def step(idx):
            seen.append(opt.param_groups[0]["lr"])
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            losses.append((loss.item(), len(idx)))
            return loss, {"n": torch.tensor(len(idx)), "batches": 1}
        r = sgd_epoch(model, n, batch_size, generator(0), opt, step, ascent=ascent, lr_at=lr_at, epoch=2)
        return r, seen, losses, model.weight.detach() - init["weight"]

    r, seen, losses, _ = run(10, 4, lr_at=lambda t: t)
    assert seen == pytest.approx([2.0, 2 + 1 / 3, 2 + 2 / 3]) and r["lr"] == pytest.approx(2 + 2 / 3)
    assert r["stats"] == {"n": 10, "batches": 3} and r["batches"] == 3
    assert r["loss"] == pytest.approx(sum(v * k for v, k in losses) / 10)
    _, seen, _, down = run(4, 4)
    _, _, _, up = run(4, 4, ascent=True)
    assert seen == [0.1] and down.abs().sum() > 0 and torch.allclose(up, -down)  # one plain SGD step each
