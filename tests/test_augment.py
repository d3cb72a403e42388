"""Batched augmentation (utils/augment.py): shapes, exact integer shifts, per-sample randomness, seeding."""
import pytest
import torch
import torch.nn.functional as F

from utils.augment import crop_flip, warp
from utils.train import generator


def images(n=8, size=32, seed=0):
    """Positive, (almost surely) pairwise distinct values: a zero in an output can only be padding."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 0.99 + 0.01


def shifted(x, dx, dy):
    """x moved right by dx and down by dy pixels, zero fill (what RandomCrop with padding does)."""
    h, w = x.shape[-2:]
    p = max(abs(dx), abs(dy))
    padded = F.pad(x, (p, p, p, p))
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


def test_crop_flip_keeps_shape_and_dtype():
    x = images(5, 32)
    y = crop_flip(x, generator(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    y = crop_flip(x.contiguous(memory_format=torch.channels_last), generator(0))
    assert y.shape == x.shape


def test_crop_flip_pixels_come_from_the_input_or_padding():
    x = images(8)
    y = crop_flip(x, generator(1), padding=4)
    for xi, yi in zip(x, y):
        allowed = torch.cat([xi.flatten(), torch.zeros(1)])
        assert torch.isin(yi.flatten(), allowed).all(), "no interpolated values"


def test_crop_flip_is_an_integer_shift_of_the_possibly_flipped_image():
    x = images(8)
    y = crop_flip(x, generator(2), padding=4)
    for xi, yi in zip(x, y):
        matches = [(dx, dy, flip) for flip in (False, True) for dx in range(-4, 5) for dy in range(-4, 5)
                   if torch.equal(yi, shifted(xi.flip(-1) if flip else xi, dx, dy))]
        assert len(matches) == 1, "exactly one crop offset and flip reproduces each output"


def test_crop_flip_without_padding_is_only_a_flip():
    x = images(8)
    y = crop_flip(x, generator(3), padding=0)
    for xi, yi in zip(x, y):
        assert torch.equal(yi, xi) or torch.equal(yi, xi.flip(-1))


def test_crop_flip_draws_parameters_per_sample():
    x = images(1).expand(32, -1, -1, -1).contiguous()   # the same image 32 times
    y = crop_flip(x, generator(4))
    distinct = {tuple(v.flatten().tolist()) for v in y}
    assert len(distinct) >= 16, "each sample gets its own offset and flip"


def test_crop_flip_same_seed_same_output():
    x = images(16)
    assert torch.equal(crop_flip(x, generator(5)), crop_flip(x, generator(5)))
    assert not torch.equal(crop_flip(x, generator(5)), crop_flip(x, generator(6)))
    # the generator advances: two calls in a row differ
    g = generator(5)
    assert not torch.equal(crop_flip(x, g), crop_flip(x, g))


def test_crop_flip_with_rotation_keeps_shape():
    x = images(4)
    y = crop_flip(x, generator(7), degrees=15.0)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_warp_with_zero_parameters_is_identity():
    x = images(6, 32)
    n = len(x)
    zero = torch.zeros(n)
    assert torch.equal(warp(x, angle=zero, shift=torch.zeros(n, 2)), x)
    assert torch.equal(warp(x, angle=zero, shift=torch.zeros(n, 2, dtype=torch.long),
                            flip=torch.zeros(n, dtype=torch.bool)), x)
    assert torch.equal(warp(x), x)
    odd = images(2, 15)
    assert torch.equal(warp(odd, angle=torch.zeros(2), shift=torch.zeros(2, 2)), odd)


def test_warp_shift_and_flip_are_exact():
    x = images(3)
    y = warp(x, shift=torch.tensor([[2, 0], [0, -3], [-1, 4]]), flip=torch.tensor([False, True, False]))
    assert torch.equal(y[0], shifted(x[0], 2, 0))
    assert torch.equal(y[1], shifted(x[1].flip(-1), 0, -3))
    assert torch.equal(y[2], shifted(x[2], -1, 4))


def test_warp_shift_matches_torchvision_translate():
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = images(1)
    for dx, dy in [(3, 0), (0, 2), (-4, 3)]:
        want = tf.affine(x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0])
        assert torch.equal(warp(x, shift=torch.tensor([[dx, dy]])), want)


def test_warp_rotation_matches_torchvision_rotate():
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = images(1)
    for angle in (30.0, 90.0, -45.0):
        assert torch.equal(warp(x, angle=torch.tensor([angle])), tf.rotate(x, angle))
