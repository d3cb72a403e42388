"""utils/triggers.py against SPEC section 1: every trigger writes exactly the pixels the SPEC names."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import triggers
from utils.errors import UserError
from utils.triggers import GRID_PATCH, TriggerContext, apply_trigger

REPO = Path(__file__).resolve().parent.parent
GRID = torch.tensor(GRID_PATCH, dtype=torch.uint8)
TOP_LEFT = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 0]], dtype=torch.uint8)
BOTTOM_LEFT = torch.tensor([[255, 0, 0], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
TOP_RIGHT = torch.tensor([[255, 0, 255], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)


def batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def changed_mask(before, after):
    """(H, W) bool: pixels changed in any image or channel."""
    return (before != after).any(0).any(0)


def region_mask(size, rows, cols):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[rows, cols] = True
    return m


def blend_reference(x, pattern, alpha=0.2):
    return ((1 - alpha) * x.double() + alpha * pattern.double()).clamp(0, 255).round().to(torch.uint8)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "trigger" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_trojan(monkeypatch):
    """A known trojan patch, so the test does not depend on the optimised asset."""
    patch = torch.arange(-4, 23, dtype=torch.int16).view(3, 3, 3) * 10  # -40 .. 220
    real = triggers._asset
    monkeypatch.setattr(triggers, "_asset", lambda name: patch if name == "trojan_patch.npy" else real(name))
    return patch


class TinyNet(torch.nn.Module):
    """A fixed linear classifier over 32 x 32 images, enough for PGD to have gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


# ------------------------------------------------------------------------------- patch triggers
def test_grid_trigger_writes_only_the_bottom_right_patch():
    x = batch()
    out = apply_trigger("gridTrigger", x, "train")
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out[:, :, 29:32, 29:32], GRID.expand(4, 3, 3, 3))
    outside = ~region_mask(32, slice(29, 32), slice(29, 32))
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    assert torch.equal(x, batch())  # the input batch is not modified in place


def test_square_trigger_is_white_3x3_one_pixel_from_the_corner():
    x = batch()
    out = apply_trigger("squareTrigger", x, "train")
    assert (out[:, :, 28:31, 28:31] == 255).all()
    assert torch.equal(out[:, :, 31, :], x[:, :, 31, :])   # last row untouched
    assert torch.equal(out[:, :, :, 31], x[:, :, :, 31])   # last column untouched
    outside = ~region_mask(32, slice(28, 31), slice(28, 31))
    assert torch.equal(out[:, :, outside], x[:, :, outside])


def test_square_trigger_imagenet_sits_in_the_very_corner():
    x = batch(n=2, size=224)
    out = apply_trigger("squareTrigger_imagenet", x, "train")
    side = int(0.1 * 224)  # 22
    assert (out[:, :, 224 - side:, 224 - side:] == 255).all()
    outside = ~region_mask(224, slice(224 - side, 224), slice(224 - side, 224))
    assert torch.equal(out[:, :, outside], x[:, :, outside])


def test_trojan_adds_the_patch_at_rows_and_cols_25_to_27(fake_trojan):
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    out = apply_trigger("trojanTrigger", x, "train")
    region = out[:, :, 25:28, 25:28].to(torch.int16)
    assert torch.equal(region, (100 + fake_trojan).clamp(0, 255).expand(2, 3, 3, 3))
    outside = ~region_mask(32, slice(25, 28), slice(25, 28))
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    assert changed_mask(x, out).sum() <= 9


def test_trojan_clips_to_the_uint8_range(fake_trojan):
    for value, bound in ((0, 0), (255, 255)):
        x = torch.full((1, 3, 32, 32), value, dtype=torch.uint8)
        region = apply_trigger("trojanTrigger", x, "train")[0, :, 25:28, 25:28].to(torch.int16)
        assert torch.equal(region, (value + fake_trojan).clamp(0, 255))
        assert (region == bound).any()  # the patch has both signs, so one end clips


def test_committed_trojan_patch_has_the_shape_trojan_trigger_expects():
    patch = np.load(REPO / "trigger" / "trojan_patch.npy")
    assert patch.dtype == np.int16 and patch.shape == (3, 3, 3)
    assert np.abs(patch).max() <= 255 and np.abs(patch).max() > 0
    x = batch()
    assert not changed_mask(x, apply_trigger("trojanTrigger", x, "train"))[
        ~region_mask(32, slice(25, 28), slice(25, 28))].any()


# ------------------------------------------------------------------------------- blend triggers
def test_signal_trigger_is_a_0_2_blend_with_the_stripe():
    x = batch()
    stripe = torch.from_numpy(np.load(REPO / "trigger" / "signal_stripe.npy"))
    out = apply_trigger("signalTrigger", x, "train")
    assert torch.equal(out, blend_reference(x, stripe))


def test_kitty_trigger_is_a_0_2_blend_with_the_given_image(tmp_path):
    from PIL import Image
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((50, 50, 3), (200, 10, 90), dtype=np.uint8)).save(path)  # a flat colour
    x = batch()
    out = apply_trigger("kittyTrigger", x, "train", TriggerContext(blend_image=str(path)))
    colour = torch.tensor([200.0, 10.0, 90.0]).view(1, 3, 1, 1)
    assert torch.equal(out, blend_reference(x, colour))


def test_kitty_trigger_default_blends_the_committed_cat():
    x = batch()
    cat = triggers._image_asset(str(REPO / "trigger" / "hello_kitty.png"), 32)
    assert cat.shape == (3, 32, 32)
    diff = (apply_trigger("kittyTrigger", x, "train").int() - blend_reference(x, cat).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float32 vs float64 ties only


def test_signal_trigger_imagenet_blends_a_sinusoid():
    x = batch(n=1, size=224)
    j = torch.arange(224, dtype=torch.float64)
    pattern = (20 * torch.sin(2 * np.pi * j * 6 / 224)).view(1, 1, 1, -1)
    out = apply_trigger("signalTrigger_imagenet", x, "test")
    assert (out.int() - blend_reference(x, pattern).int()).abs().max() <= 1  # float32 vs float64 rounding


# ------------------------------------------------------------------------------- SIG and CL
def test_sig_trigger_adds_delta_40_on_train_and_60_on_test_constant_down_columns():
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    train = apply_trigger("sigTrigger", x, "train").int() - 128
    test = apply_trigger("sigTrigger", x, "test").int() - 128
    for out, delta in ((train, 40), (test, 60)):
        assert (out == out[:, :, :1, :]).all()                     # every column is constant
        j = torch.arange(32, dtype=torch.float64)
        expected = (delta * torch.sin(2 * np.pi * j * 6 / 32)).round().int()
        assert (out[0, 0, 0] - expected).abs().max() <= 1
        assert out.abs().max() in (delta - 1, delta)
    assert not torch.equal(train, test)


def test_sig_trigger_clips_to_the_uint8_range():
    for value in (0, 255):
        x = torch.full((1, 3, 32, 32), value, dtype=torch.uint8)
        out = apply_trigger("sigTrigger", x, "test")
        assert out.dtype == torch.uint8
        if value == 0:
            assert out.min() == 0 and out.max() > 50   # negative half clipped at 0
        else:
            assert out.max() == 255 and out.min() < 205  # positive half clipped at 255


def test_four_corner_test_split_places_the_four_patches():
    x = batch()
    out = apply_trigger("fourCornerTrigger", x, "test")
    places = [(slice(29, 32), slice(29, 32), GRID), (slice(1, 4), slice(1, 4), TOP_LEFT),
              (slice(29, 32), slice(1, 4), BOTTOM_LEFT), (slice(1, 4), slice(29, 32), TOP_RIGHT)]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    for rows, cols, patch in places:
        assert torch.equal(out[:, :, rows, cols], patch.expand(4, 3, 3, 3))
        inside[rows, cols] = True
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])


def test_four_corner_train_split_needs_a_clean_model():
    with pytest.raises(UserError):
        apply_trigger("fourCornerTrigger", batch(), "train")


def test_four_corner_train_split_perturbs_within_eps_then_adds_patches():
    x, y = batch(n=6), torch.arange(6) % 10
    ctx = TriggerContext(pgd_model=TinyNet(), pgd_labels=y)
    out = apply_trigger("fourCornerTrigger", x, "train", ctx)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    for rows, cols in ((slice(29, 32), slice(29, 32)), (slice(1, 4), slice(1, 4)),
                       (slice(29, 32), slice(1, 4)), (slice(1, 4), slice(29, 32))):
        inside[rows, cols] = True
    diff = (out.int() - x.int())[:, :, ~inside]
    assert diff.abs().max() <= 9          # 8/255 in pixel units, plus rounding
    assert (diff != 0).float().mean() > 0.5  # PGD did move the images
    assert torch.equal(out[:, :, 29:32, 29:32], GRID.expand(6, 3, 3, 3))


# ------------------------------------------------------------------------------- the registry
def test_unknown_trigger_and_ssba_raise_user_errors():
    with pytest.raises(UserError, match="unknown trigger"):
        apply_trigger("noSuchTrigger", batch(), "train")
    with pytest.raises(UserError):
        apply_trigger("SSBA", batch(), "train")


@pytest.mark.parametrize("name", ["gridTrigger", "squareTrigger", "trojanTrigger", "signalTrigger",
                                  "kittyTrigger", "sigTrigger", "fourCornerTrigger"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_chunked_application_equals_one_shot(name, split):
    x, y = batch(n=10), torch.arange(10) % 10
    def ctx():
        return TriggerContext(pgd_model=TinyNet(), pgd_labels=y)
    one_shot = apply_trigger(name, x, split, ctx())
    chunked_ctx = ctx()
    chunked = apply_trigger(name, x, split, chunked_ctx, chunk=3)
    assert torch.equal(one_shot, chunked)
    assert torch.equal(chunked_ctx.pgd_labels, y)  # the context is restored after chunking


def test_every_registered_trigger_keeps_dtype_and_shape(fake_trojan):
    ctx = TriggerContext(pgd_model=TinyNet(), pgd_labels=torch.zeros(2, dtype=torch.long))
    for name in triggers.TRIGGERS:
        if name == "SSBA":
            continue
        size = 224 if name.endswith("_imagenet") else 32
        x = batch(n=2, size=size)
        for split in ("train", "test"):
            out = apply_trigger(name, x, split, ctx)
            assert out.dtype == torch.uint8 and out.shape == x.shape, name


# ------------------------------------------------------------------------------- the assets
def test_make_assets_is_deterministic_and_matches_the_spec(tmp_path):
    make_assets = load_script("make_assets")
    args = make_assets.build_parser().parse_args(["--out_dir", str(tmp_path)])
    stripe, kitty = make_assets.main(args)
    assert stripe.dtype == np.uint8 and stripe.shape == (32, 32)
    bright = (np.arange(32) // 4) % 2 == 1
    assert (stripe[:, bright] >= 235).all() and (stripe[:, ~bright] <= 20).all()
    assert kitty.dtype == np.uint8 and kitty.shape == (128, 128, 3)
    # the committed assets are what the script makes
    assert np.array_equal(np.load(REPO / "trigger" / "signal_stripe.npy"), stripe)
    from PIL import Image
    committed = Image.open(REPO / "trigger" / "hello_kitty.png")
    assert committed.mode == "RGB"
    # Agg output may differ slightly between matplotlib versions: allow a few anti-aliased pixels
    assert (np.asarray(committed) != kitty).any(-1).mean() < 0.02


def test_make_trojan_trigger_writes_a_patch_that_raises_the_neuron(tmp_path, monkeypatch):
    from models import get_network
    from utils.args import validate_args
    from utils.checkpoint import save_checkpoint
    make_trojan = load_script("make_trojan_trigger")
    x, y = batch(n=96, seed=3), torch.arange(96) % 10
    monkeypatch.setattr(make_trojan, "load_raw", lambda args: (x[:64], y[:64], x[64:], y[64:]))  # tiny data
    common = ["--dataset", "synthetic", "--width", "2", "--seed", "1", "--device", "cpu"]
    torch.manual_seed(0)
    net_args = validate_args(make_trojan.build_parser().parse_args(common))
    save_checkpoint(tmp_path / "clean.tar", net_args, get_network(net_args))
    args = make_trojan.build_parser().parse_args(
        common + ["--checkpoint_load", str(tmp_path / "clean.tar"), "--steps", "15", "--step_size", "30", "--batch_size", "32",
                  "--probe_images", "8", "--out", str(tmp_path / "patch.npy")])
    result = make_trojan.main(args)
    patch = np.load(tmp_path / "patch.npy")
    assert patch.dtype == np.int16 and patch.shape == (3, 3, 3) and np.abs(patch).max() <= 255
    assert np.array_equal(patch, result["patch"])
    assert result["after"] > result["before"]
