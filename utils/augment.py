"""Batched image transforms with per-sample random parameters.

All functions take float images (N, 3, H, W) in [0, 1] on any device and draw their parameters
from an explicit CPU ``torch.Generator`` (so the same seed gives the same transforms on CPU and
GPU, whatever the batch size). Geometric transforms are one ``grid_sample`` call for the whole
batch; nearest sampling with zero fill reproduces torchvision's defaults (integer pixel shifts
stay exact).
"""
import math

import torch
import torch.nn.functional as F


def _uniform(n, low, high, g):
    return torch.rand(n, generator=g) * (high - low) + low


def to_device(t, device):
    """Move a small host tensor of random parameters to ``device`` without stalling a GPU: a copy
    from pageable memory waits for every queued kernel, one from pinned memory does not."""
    if t.device == torch.device(device) or torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def warp(x, angle=None, shift=None, flip=None, scale=None, center=None, mode="nearest"):
    """One affine warp per sample. angle: degrees (N,); shift: pixels (N, 2) as (dx, dy);
    flip: bool (N,) horizontal flips; scale/center: (N, 2) crop size and centre in [-1, 1] units.
    The (N, 2, 3) matrices are built on the host, where the parameters were drawn, and travel to
    the device in one copy."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if angle is not None:
        a = torch.deg2rad(angle.cpu().float())
        cos, sin = torch.cos(a), torch.sin(a)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos  # counter-clockwise, as torchvision
    if flip is not None:
        theta[:, :, 0] *= torch.where(flip.cpu(), -1.0, 1.0)[:, None]
    if shift is not None:  # input = R^T (output - t): t in normalised units (2 px / size)
        t = shift.cpu().float() * torch.tensor([2.0 / w, 2.0 / h])
        theta[:, :, 2] = -torch.einsum("nij,nj->ni", theta[:, :, :2], t)
    if scale is not None:
        theta[:, :, :2] *= scale.cpu().float()[:, :, None]
        theta[:, :, 2] += center.cpu().float()
    grid = F.affine_grid(to_device(theta, x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------- training augmentation
def crop_flip(x, g, padding=4, degrees=0.0):
    """RandomCrop(size, padding) + RandomHorizontalFlip (+ RandomRotation(degrees) when > 0)."""
    n, _, h, w = x.shape
    shift = torch.randint(-padding, padding + 1, (n, 2), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    angle = _uniform(n, -degrees, degrees, g) if degrees else None
    return warp(x, angle=angle, shift=shift, flip=flip)


def rotate_flip(x, g, degrees=20.0):
    """ImageNet: RandomRotation(20) + RandomHorizontalFlip."""
    n = len(x)
    return warp(x, angle=_uniform(n, -degrees, degrees, g), flip=torch.rand(n, generator=g) < 0.5)


def train_augmentation(dataset):
    """The classical augmentation of the withTrans model (SPEC section 5.1), per dataset."""
    if dataset == "imagenet":
        return rotate_flip
    if dataset == "cifar100":
        return lambda x, g: crop_flip(x, g, degrees=15.0)
    return crop_flip


# ----------------------------------------------------------------------- FCT transforms (tau)
def gaussian_blur(x, sigma, kernel_size=15):
    """Per-sample Gaussian blur (reflect padding, as torchvision's GaussianBlur)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    r = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (r[None] / sigma.to(x.device).float()[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).to(x.dtype)                    # (N, K)
    k = k.repeat_interleave(c, 0)                                   # (N*C, K)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def sample_erase(n, g, scale=(0.2, 0.3), ratio=(0.5, 1.0)):
    """Rectangle of RandomErasing(p=1, scale, ratio) per sample, as fractions of the image."""
    return {"area": _uniform(n, *scale, g),
            "log_ratio": _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g),
            "pos": torch.rand(n, 2, generator=g),
            "noise_seed": torch.randint(0, 2**62, (n,), generator=g)}


def erase(x, area, log_ratio, pos, noise_seed):
    """RandomErasing(value='random'): each image gets one rectangle filled with uniform noise.
    The noise of a batch is seeded by its first sample's seed (rectangles are per sample)."""
    n, c, h, w = x.shape
    r = torch.exp(log_ratio)
    eh = torch.sqrt(area * h * w * r).round().clamp(1, h).long()
    ew = torch.sqrt(area * h * w / r).round().clamp(1, w).long()
    y0 = (pos[:, 0] * (h - eh + 1)).floor().long()
    x0 = (pos[:, 1] * (w - ew + 1)).floor().long()
    g = torch.Generator()
    g.manual_seed(int(noise_seed[0]))
    noise = torch.rand(x.shape, generator=g).to(x.device, x.dtype)
    rows, cols = torch.arange(h)[None], torch.arange(w)[None]
    mask = (((rows >= y0[:, None]) & (rows < (y0 + eh)[:, None]))[:, :, None]
            & ((cols >= x0[:, None]) & (cols < (x0 + ew)[:, None]))[:, None, :])
    return torch.where(mask[:, None].to(x.device), noise, x)


def sample_fct_params(name, n, g, size):
    """Per-sample parameters of one FCT transform for n samples (drawn in sample order)."""
    if name == "rotate":    # RandomRotation(180)
        return {"angle": _uniform(n, -180, 180, g)}
    if name == "affine":    # RandomAffine(0, translate=(0.2, 0.2)): integer shifts up to 20 %
        return {"shift": torch.round(_uniform(2 * n, -0.2 * size, 0.2 * size, g)).view(n, 2)}
    if name == "flip":      # RandomHorizontalFlip
        return {"flip": torch.rand(n, generator=g) < 0.5}
    if name == "crop":      # RandomCrop(size, padding=4)
        return {"shift": torch.randint(-4, 5, (n, 2), generator=g)}
    if name == "blur":      # GaussianBlur(15, sigma=(0.1, 2))
        return {"sigma": _uniform(n, 0.1, 2.0, g)}
    if name == "erase":     # RandomErasing(p=1, scale=(0.2, 0.3), ratio=(0.5, 1), value='random')
        return sample_erase(n, g)
    if name == "none":
        return {}
    raise ValueError(f"unknown FCT transform '{name}'")


def apply_fct_transform(name, x, params):
    if name in ("rotate", "affine", "flip", "crop"):
        return warp(x, **params)
    if name == "blur":
        return gaussian_blur(x, params["sigma"])
    if name == "erase":
        return erase(x, **params)
    return x


# ----------------------------------------------------------------------- contrastive views (D-ST)
def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _rgb_to_hsv(x):
    r, g_, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / d, (maxc - g_) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g_, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (r, g_, b) in enumerate(choices):
        m = (i == k)[:, None]
        out = torch.where(m, torch.stack([r, g_, b], 1), out)
    return out


def color_jitter(x, g, strength=(0.4, 0.4, 0.4, 0.1), p=0.8):
    """ColorJitter(brightness, contrast, saturation, hue) applied with probability p per sample."""
    n, dev = len(x), x.device
    b, c, s, hue = strength
    on = to_device(torch.rand(n, generator=g) < p, dev)[:, None, None, None]
    fb, fc, fs = (to_device(_uniform(n, 1 - v, 1 + v, g), dev)[:, None, None, None] for v in (b, c, s))
    fh = to_device(_uniform(n, -hue, hue, g), dev)[:, None, None]
    y = (x * fb).clamp(0, 1)
    y = ((y - _gray(y).mean((2, 3), keepdim=True)) * fc + _gray(y).mean((2, 3), keepdim=True)).clamp(0, 1)
    y = ((y - _gray(y)) * fs + _gray(y)).clamp(0, 1)
    hsv = _rgb_to_hsv(y)
    hsv = torch.stack([(hsv[:, 0] + fh) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    y = _hsv_to_rgb(hsv)
    return torch.where(on, y, x)


def random_grayscale(x, g, p=0.2):
    on = to_device(torch.rand(len(x), generator=g) < p, x.device)[:, None, None, None]
    return torch.where(on, _gray(x).expand_as(x), x)


def random_resized_crop(x, g, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop(size, scale) + RandomHorizontalFlip, bilinear, as one warp."""
    n = len(x)
    area = _uniform(n, *scale, g)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), g))
    cw = torch.sqrt(area * r).clamp(max=1.0)
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - cw)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - ch)
    flip = torch.rand(n, generator=g) < 0.5
    sx = torch.where(flip, -cw, cw)
    return warp(x, scale=torch.stack([sx, ch], 1), center=torch.stack([cx, cy], 1), mode="bilinear")


def supcon_view(x, g):
    """One SupCon view (SPEC section 4.1): resized crop, flip, colour jitter (p 0.8), grayscale (p 0.2)."""
    return random_grayscale(color_jitter(random_resized_crop(x, g), g), g)
