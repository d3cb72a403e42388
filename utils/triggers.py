"""Backdoor triggers (SPEC section 1) as pure functions over a batch of uint8 images.

Every trigger has the signature ``trigger(images, split, ctx) -> images``: ``images`` is a uint8
tensor (N, 3, H, W), ``split`` is "train" or "test" (SIG and CL differ between the two) and ``ctx``
holds the few things a trigger may need (asset paths, the clean model of CL). Blends and additions
are computed in float and clipped to [0, 255] before the cast back to uint8. Adding an attack is
one function and one row of ``TRIGGERS``.
"""
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.ssba import default_encoder_path, encode_uint8, load_encoder

ASSETS = Path(__file__).resolve().parent.parent / "trigger"
GRID_PATCH = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]  # the original's bottom-right pattern
CORNER_PATCHES = {  # fourCornerTrigger: (row slice, col slice) -> patch, for an H x W image
    "bottom_right": GRID_PATCH,
    "top_left": [[255, 0, 255], [0, 255, 0], [255, 0, 0]],
    "bottom_left": [[255, 0, 0], [0, 255, 0], [255, 0, 255]],
    "top_right": [[255, 0, 255], [0, 255, 0], [0, 0, 255]],
}
BLEND_ALPHA = 0.2
# the committed file each trigger reads from trigger/ (SSBA's encoder: utils.ssba.default_encoder_path)
ASSET_FILES = {"trojanTrigger": "trojan_patch.npy", "signalTrigger": "signal_stripe.npy",
               "kittyTrigger": "hello_kitty.png"}
# the flag that replaces a trigger's committed file with the user's own, and its folder-name tag
OWN_ASSET_FLAGS = {"kittyTrigger": ("blend_image", "img"), "SSBA": ("ssba_encoder", "enc")}


@dataclass
class TriggerContext:
    blend_image: str = None      # kittyTrigger: image to blend (default trigger/hello_kitty.png)
    pgd_model: object = None     # fourCornerTrigger: clean model (float [0,1] NCHW -> logits)
    pgd_labels: object = None    # fourCornerTrigger: true labels of the images being poisoned
    ssba_encoder: str = None     # SSBA: encoder file (default trigger/ssba_encoder_<dataset>.pt)
    dataset: str = None          # SSBA: names the default encoder file
    device: object = "cpu"       # SSBA: where the encoder runs


def _blend(images, pattern, alpha=BLEND_ALPHA):
    out = (1 - alpha) * images.float() + alpha * pattern.to(images.device).float()
    return out.clamp(0, 255).round().to(torch.uint8)


def _add(images, delta):
    return (images.float() + delta.to(images.device).float()).clamp(0, 255).round().to(torch.uint8)


def _paste(images, rows, cols, patch):
    out = images.clone()
    out[:, :, rows, cols] = torch.tensor(patch, dtype=torch.uint8, device=images.device)
    return out


def grid_trigger(images, split, ctx):
    h, w = images.shape[-2:]
    return _paste(images, slice(h - 3, h), slice(w - 3, w), GRID_PATCH)


def square_trigger(images, split, ctx):
    h, w = images.shape[-2:]
    s = int(0.1 * h)  # one pixel away from the bottom-right corner
    out = images.clone()
    out[:, :, h - 1 - s:h - 1, w - 1 - s:w - 1] = 255
    return out


def square_trigger_imagenet(images, split, ctx):
    h, w = images.shape[-2:]
    s = int(0.1 * h)
    out = images.clone()
    out[:, :, h - s:, w - s:] = 255
    return out


def own_asset(args):
    """(tag, path) of the user's own file for args' trigger (--blend_image for kittyTrigger,
    --ssba_encoder for SSBA), or None when the trigger uses its committed file."""
    flag, tag = OWN_ASSET_FLAGS.get(args.trigger_type, (None, None))
    value = getattr(args, flag, None) if flag else None
    return (tag, Path(value)) if value else None


def asset_path(args):
    """The file a trigger reads (blend image, stripe, Trojan patch, SSBA encoder), or None when the
    trigger is drawn in code."""
    own = own_asset(args)
    if own:
        return own[1]
    if args.trigger_type == "SSBA":
        return default_encoder_path(args.dataset)
    return ASSETS / ASSET_FILES[args.trigger_type] if args.trigger_type in ASSET_FILES else None


def asset_fingerprint(args):
    """First 12 hex digits of the SHA-256 of the trigger's file ("" for triggers drawn in code or a
    missing file, which the trigger itself reports). Checkpoints and splits record it, so that an
    output made with another image or patch is refused instead of silently reused."""
    path = asset_path(args)
    if path is None or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@lru_cache(maxsize=None)
def _asset(name):
    path = ASSETS / name
    if not path.exists():
        raise UserError(f"trigger asset {path} is missing; run `python trigger/make_assets.py`"
                        + (" and `python trigger/make_trojan_trigger.py`" if "trojan" in name else ""))
    return torch.from_numpy(np.load(path))


@lru_cache(maxsize=None)
def _image_asset(path, size):
    import matplotlib.image as mpimg
    path = Path(path)
    if not path.exists():
        raise UserError(f"blend image {path} not found (kittyTrigger --blend_image)")
    raw = np.asarray(mpimg.imread(path))
    img = torch.from_numpy(raw.astype(np.float32))
    if np.issubdtype(raw.dtype, np.floating):  # matplotlib reads PNGs as floats in [0, 1]
        img = img * 255
    if img.ndim == 2:
        img = img[..., None].expand(-1, -1, 3)
    if img.shape[-1] == 4:  # transparent areas are white, not whatever colour they store
        alpha = img[..., 3:] / 255
        img = img[..., :3] * alpha + 255 * (1 - alpha)
    img = img[..., :3].permute(2, 0, 1)[None]
    return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def trojan_trigger(images, split, ctx):
    h, w = images.shape[-2:]
    patch = _asset(ASSET_FILES["trojanTrigger"]).to(torch.int16)  # (3, 3, 3) additive values
    delta = torch.zeros(3, h, w, dtype=torch.int16)
    delta[:, h - 7:h - 4, w - 7:w - 4] = patch          # rows/cols 25-27 on 32 x 32
    return _add(images, delta)


def signal_trigger(images, split, ctx):
    stripe = _asset(ASSET_FILES["signalTrigger"])        # (32, 32) uint8 vertical stripes
    h, w = images.shape[-2:]
    if stripe.shape != (h, w):
        stripe = F.interpolate(stripe[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    return _blend(images, stripe)


def kitty_trigger(images, split, ctx):
    path = ctx.blend_image or str(ASSETS / ASSET_FILES["kittyTrigger"])
    return _blend(images, _image_asset(path, images.shape[-1]))


def _sinusoid(w, delta, freq=6):
    j = torch.arange(w, dtype=torch.float32)
    return delta * torch.sin(2 * np.pi * j * freq / w)   # varies along the columns


def sig_trigger(images, split, ctx):
    delta = 40 if split == "train" else 60
    return _add(images, _sinusoid(images.shape[-1], delta).view(1, 1, 1, -1))


def signal_trigger_imagenet(images, split, ctx):
    return _blend(images, _sinusoid(images.shape[-1], 20).view(1, 1, 1, -1))


def four_corner_patches(images):
    h, w = images.shape[-2:]
    places = {"bottom_right": (slice(h - 3, h), slice(w - 3, w)), "top_left": (slice(1, 4), slice(1, 4)),
              "bottom_left": (slice(h - 3, h), slice(1, 4)), "top_right": (slice(1, 4), slice(w - 3, w))}
    for name, (rows, cols) in places.items():
        images = _paste(images, rows, cols, CORNER_PATCHES[name])
    return images


def pgd_perturb(model, images, labels, eps=8 / 255, step=2 / 255, steps=4, batch_size=256):
    """Untargeted L-inf PGD against a clean model (CL attack): push each image away from its label."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x0 = images[i:i + batch_size].to(device).float() / 255
        y = labels[i:i + batch_size].to(device)
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            grad, = torch.autograd.grad(loss, x)
            x = (x.detach() + step * grad.sign()).clamp(x0 - eps, x0 + eps).clamp(0, 1)
        out.append((x * 255).round().to(torch.uint8).cpu())
    return torch.cat(out) if out else images


def four_corner_trigger(images, split, ctx):
    if split == "train":
        if ctx.pgd_model is None:
            raise UserError("fourCornerTrigger (CL) needs a clean model: run train_clean_withTrans.py "
                            "or pass --clean_model")
        if ctx.pgd_labels is None or len(ctx.pgd_labels) != len(images):
            raise UserError("fourCornerTrigger (CL) needs the true labels of the images it perturbs")
        images = pgd_perturb(ctx.pgd_model, images, ctx.pgd_labels)
    return four_corner_patches(images)


def ssba_trigger(images, split, ctx):
    """SSBA: every image gets its own small residual from the trained encoder, all hiding the
    same secret code (trigger/train_ssba_encoder.py trains the encoder and draws the code)."""
    if ctx.ssba_encoder is None and ctx.dataset is None:
        raise UserError("SSBA needs an encoder file: pass --ssba_encoder (or --dataset for the default one)")
    path = ctx.ssba_encoder or default_encoder_path(ctx.dataset)
    encoder, _, config, code = load_encoder(path, ctx.dataset)
    size = tuple(images.shape[-2:])
    if size != (config["image_size"],) * 2:
        raise UserError(f"SSBA encoder {path} was trained on {config['image_size']}x{config['image_size']} "
                        f"images, but these are {size[0]}x{size[1]}; train one for this dataset")
    return encode_uint8(encoder, images, code, ctx.device)


TRIGGERS = {
    "gridTrigger": grid_trigger,
    "squareTrigger": square_trigger,
    "trojanTrigger": trojan_trigger,
    "signalTrigger": signal_trigger,
    "kittyTrigger": kitty_trigger,
    "sigTrigger": sig_trigger,
    "fourCornerTrigger": four_corner_trigger,
    "SSBA": ssba_trigger,
    "squareTrigger_imagenet": square_trigger_imagenet,
    "signalTrigger_imagenet": signal_trigger_imagenet,
}


def apply_trigger(name, images, split, ctx=None, chunk=4096):
    """Apply trigger ``name`` to a uint8 (N, 3, H, W) batch, in chunks to bound memory."""
    if name not in TRIGGERS:
        raise UserError(f"unknown trigger '{name}'; choose one of {', '.join(TRIGGERS)}")
    ctx = ctx or TriggerContext()
    fn = TRIGGERS[name]
    if len(images) <= chunk:
        return fn(images, split, ctx)
    labels = ctx.pgd_labels
    parts = []
    try:
        for i in range(0, len(images), chunk):
            if labels is not None:
                ctx.pgd_labels = labels[i:i + chunk]
            parts.append(fn(images[i:i + chunk], split, ctx))
    finally:
        ctx.pgd_labels = labels
    return torch.cat(parts)
