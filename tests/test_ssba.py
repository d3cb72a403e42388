"""SSBA: the encoder / decoder training script, the encoder file and the trigger (utils/ssba.py,
trigger/train_ssba_encoder.py, utils.triggers.ssba_trigger). A tiny encoder on synthetic data."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dataloader_bd import build_datasets
from utils.args import build_parser, validate_args
from utils.errors import UserError
from utils.ssba import load_encoder, psnr, secret_code
from utils.triggers import TriggerContext, apply_trigger

REPO = Path(__file__).resolve().parent.parent
# 12 epochs x 16 steps of 16 images; no image loss, so the few steps all go to the bits
TINY = ["--dataset", "synthetic", "--device", "cpu", "--seed", "0", "--bits", "8", "--epochs", "12",
        "--batch_size", "16", "--encoder_width", "8", "--code_channels", "4", "--decoder_width", "16",
        "--lr", "3e-3", "--l2_weight", "0", "--target_psnr", "0"]


def load_trainer():
    spec = importlib.util.spec_from_file_location("train_ssba_encoder", REPO / "trigger" / "train_ssba_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth_images(n, seed):
    """Smooth random colour layouts (4 x 4 upsampled): the decoder learns fastest on images without noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 255
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False).round().to(torch.uint8)


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny encoder trained for a few steps: (script result, encoder path, trainer module)."""
    trainer = load_trainer()
    x_train, x_test = smooth_images(256, 0), smooth_images(64, 1)
    trainer.load_raw = lambda args: (x_train, torch.zeros(256), x_test, torch.zeros(64))  # this module copy only
    path = tmp_path_factory.mktemp("ssba") / "enc.pt"
    result = trainer.main(trainer.build_parser().parse_args(TINY + ["--out", str(path)]))
    return result, path, trainer


def test_decoder_bit_accuracy_rises_above_chance(tiny, margin):
    result, path, _ = tiny
    margin("bit accuracy", result["bit_acc"], "> 60")
    margin("bit accuracy, secret code", result["bit_acc_secret"], "> 60")
    assert result["bit_acc"] > 60          # chance: 50 % +- 2.2 % (64 images x 8 bits)
    assert result["bit_acc_secret"] > 60
    log = (path.parent / "enc_log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,lambda,loss") and len(log) == 1 + 12


def test_lambda_ramps_from_zero_to_the_final_weight():
    trainer = load_trainer()
    args = trainer.build_parser().parse_args(["--l2_weight", "8", "--l2_start", "0.25", "--l2_full", "0.75"])
    assert [trainer.l2_lambda(args, s, 100) for s in (0, 25, 50, 75, 100)] == [0, 0, 4, 8, 8]


def test_file_is_small_self_describing_and_reloads_to_identical_output(tiny):
    result, path, _ = tiny
    assert path.stat().st_size < 2 * 2 ** 20
    state = torch.load(path, weights_only=True)
    config = state["config"]
    assert config["bits"] == 8 and config["image_size"] == 32 and config["dataset"] == "synthetic"
    assert torch.equal(state["secret_code"], secret_code(8, config["code_seed"]))
    assert config["test_psnr"] == round(result["psnr"], 3) and "train_wall_s" in config and "train_cpu_s" in config
    encoder, _, _, _ = load_encoder(path)
    twin = type(encoder)(8, 32, 8, 4, config["residual_scale"])
    twin.load_state_dict(state["encoder"])
    x, bits = torch.rand(3, 3, 32, 32), torch.randint(0, 2, (3, 8))
    with torch.no_grad():
        assert torch.equal(encoder(x, bits), twin(x, bits))


def test_residual_is_sample_specific_invisible_ish_and_deterministic(tiny):
    _, path, _ = tiny
    ctx = TriggerContext(ssba_encoder=str(path))
    x = images(4)
    out = apply_trigger("SSBA", x, "train", ctx)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    residual = out.int() - x.int()
    assert residual.abs().sum() > 0
    for i in range(1, 4):
        assert not torch.equal(residual[0], residual[i])   # each image gets its own residual
    assert torch.equal(apply_trigger("SSBA", x, "test", ctx), out)    # same code, same output
    assert residual.abs().max() <= 26                     # bounded by residual_scale 0.1 (25.5 levels)
    assert (psnr(x, out) > 20).all()


def test_same_image_same_residual_across_batches(tiny):
    _, path, _ = tiny
    ctx = TriggerContext(ssba_encoder=str(path))
    x = images(10)
    one_shot = apply_trigger("SSBA", x, "train", ctx)
    chunked = apply_trigger("SSBA", x, "train", ctx, chunk=3)
    assert (one_shot.int() - chunked.int()).abs().max() <= 1   # batch size may change float rounding only


def test_missing_encoder_is_a_user_error_naming_the_script(tmp_path):
    with pytest.raises(UserError, match="train_ssba_encoder.py"):
        apply_trigger("SSBA", images(), "train", TriggerContext(ssba_encoder=str(tmp_path / "absent.pt")))
    with pytest.raises(UserError, match="train_ssba_encoder.py"):
        apply_trigger("SSBA", images(), "train", TriggerContext(dataset="no_such_dataset"))
    with pytest.raises(UserError):
        apply_trigger("SSBA", images(), "train")   # neither a path nor a dataset


def test_image_size_mismatch_is_a_user_error(tiny):
    _, path, _ = tiny
    with pytest.raises(UserError, match="32x32"):
        apply_trigger("SSBA", torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "train",
                      TriggerContext(ssba_encoder=str(path)))


def test_existing_encoder_is_not_overwritten_without_the_flag(tiny):
    _, path, trainer = tiny
    before = path.read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        trainer.main(trainer.build_parser().parse_args(TINY + ["--out", str(path), "--epochs", "1"]))
    assert path.read_bytes() == before


def test_not_an_encoder_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(UserError, match="not an SSBA encoder"):
        apply_trigger("SSBA", images(), "train", TriggerContext(ssba_encoder=str(bad)))


def test_build_datasets_poisons_with_the_encoder(tiny):
    _, path, _ = tiny
    args = validate_args(build_parser("t").parse_args(
        ["--dataset", "synthetic", "--device", "cpu", "--trigger_type", "SSBA", "--ssba_encoder", str(path)]))
    from dataloader_bd import make_synthetic
    raw = make_synthetic(n_train=300, n_test=50)
    train, tests = build_datasets(args, raw=raw)
    x_train = raw[0]
    poisoned = torch.from_numpy(train.poison_indices)
    assert len(poisoned) == 27                                   # floor(0.1 * non-target samples)
    changed = (train.images != x_train).flatten(1).any(1)
    assert changed[poisoned].all() and not changed[train.is_clean].any()
    assert (train.labels[poisoned] == 0).all()
    assert not torch.equal(tests.bd_images, tests.bd_clean_images)


COMMITTED = REPO / "trigger" / "ssba_encoder_cifar10.pt"


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed CIFAR-10 SSBA encoder")
def test_committed_cifar10_encoder_is_small_and_meets_psnr_and_bit_accuracy_targets():
    assert COMMITTED.stat().st_size < 2 * 2 ** 20
    _, _, config, code = load_encoder(COMMITTED)
    assert config["image_size"] == 32 and config["bits"] == 32 and len(code) == 32
    assert config["test_psnr"] >= 27 and config["test_bit_acc"] >= 95
    out = apply_trigger("SSBA", images(8), "train", TriggerContext(dataset="cifar10"))
    assert out.dtype == torch.uint8 and out.shape == (8, 3, 32, 32)
