"""Find the Trojan (TrojanNN-style) trigger patch against a clean model (SPEC section 1, trojanTrigger).

TrojanNN picks neurons of an internal layer and optimises a trigger patch so that those neurons fire
strongly. Here:

* layer: the penultimate features of the clean model (``model.features``, after the global pool);
* neuron (``--neuron_rule``):
    - ``responsive`` (default): the unit j maximising W[t, j] * g_j, where W is the linear head, t
      the target class and g_j the rise of unit j's mean activation (over ``--probe_images``
      training images) under the patch 255 * sign(d activation_j / d patch), i.e. one full-size
      gradient-sign step; units that do not rise (g_j <= 0) are never chosen. It picks a unit the
      3 x 3 patch can actually move *and* that pushes the target logit. (Measured on the width-16
      clean model of the CIFAR subset: the unit with the largest W[t, j] barely responds to a
      3 x 3 patch, +3% after optimisation; the committed patch drives the unit this rule picks
      from 0.764 to 0.864, +13%, on average over the 5,170 training images.)
    - ``target``: the unit with the largest weight W[t, j] into the target class;
    - ``connected``: TrojanNN's "most connected" unit, the largest sum over classes of |W[:, j]|;
    - or an explicit ``--neuron J``;
* patch: 3 x 3 x 3 additive values in [-255, 255] at rows/cols H-7..H-5 x W-7..W-5 (25-27 on 32 x 32),
  exactly where ``utils.triggers.trojan_trigger`` adds it; added to the uint8 image and clipped;
* objective: the mean activation of the chosen unit over clean training images, maximised by
  gradient-sign ascent on random mini-batches (step size ``--step_size`` pixel units, decayed to 0
  on a cosine), the patch clipped to [-255, 255] after every step and rounded to integers at the end.

Writes ``trigger/trojan_patch.npy`` (int16, (3, 3, 3) = channel x row x col).

    python trigger/make_trojan_trigger.py --data_file X.npz --width 16 --save_root ./saved
"""
import math
from pathlib import Path

import numpy as np
import torch

from dataloader_bd import load_raw
from utils.args import build_parser as shared_parser, resolve_device, validate_args
from utils.checkpoint import check_compatible, model_from_checkpoint
from utils.errors import UserError, run_main
from utils.paths import clean_model_dir, latest_checkpoint

HERE = Path(__file__).resolve().parent
PATCH = 3        # side of the square patch (pixels)
OFFSET = 7       # the patch starts 7 pixels before the bottom/right edge (row/col 25 of 32)


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "io"))
    g = p.add_argument_group("trojan trigger")
    g.add_argument("--neuron_rule", default="responsive", choices=("responsive", "target", "connected"),
                   help="which feature unit to drive (see the module docstring)")
    g.add_argument("--neuron", type=int, default=None, help="drive this feature unit instead of --neuron_rule")
    g.add_argument("--probe_images", type=int, default=64,
                   help="training images on which each unit's response to the patch is measured (responsive rule)")
    g.add_argument("--steps", type=int, default=300, help="optimisation steps")
    g.add_argument("--step_size", type=float, default=8.0,
                   help="first sign-ascent step, in pixel units (0..255); decays to 0 on a cosine")
    g.add_argument("--batch_size", type=int, default=256, help="clean training images per step")
    g.add_argument("--out", default=str(HERE / "trojan_patch.npy"), help="where the patch is written")
    return p


def load_clean_model(args, device):
    """The clean model of train_clean_withTrans.py (or --checkpoint_load), in eval mode."""
    path = args.checkpoint_load or latest_checkpoint(clean_model_dir(args))
    if path is None:
        raise UserError(f"no clean model in {clean_model_dir(args)}; run train_clean_withTrans.py with the "
                        "same --dataset/--data_file/--model/--width/--seed/--save_root, or pass --checkpoint_load")
    model, ckpt = model_from_checkpoint(path)
    check_compatible(ckpt, args, ("dataset",), path)  # the architecture comes from the checkpoint itself
    print(f"clean model: {path} ({ckpt['args'].get('model')}, width {ckpt['args'].get('width')})")
    return model.to(device).eval()


def patch_response(model, images):
    """g_j: how much unit j's mean activation over ``images`` rises under the patch
    255 * sign(d mean_activation_j / d patch), for every feature unit j. images: uint8 (N, 3, H, W) -> (D,)."""
    device = next(model.parameters()).device
    images = images.to(device)
    patch = torch.zeros(3, PATCH, PATCH, device=device, requires_grad=True)
    features = model.features(with_patch(images, patch)).mean(0)   # (D,)
    gains = torch.empty(len(features))
    for j in range(len(features)):
        grad, = torch.autograd.grad(features[j], patch, retain_graph=True)
        with torch.no_grad():
            gains[j] = model.features(with_patch(images, 255 * grad.sign()))[:, j].mean() - features[j]
    return gains


def choose_neuron(model, images, args):
    """Index of the feature unit to drive (see the module docstring)."""
    weight = model.linear.weight.detach()          # (num_classes, feature_dim)
    if args.neuron is not None:
        if not 0 <= args.neuron < weight.shape[1]:
            raise UserError(f"--neuron must be in 0..{weight.shape[1] - 1}")
        return args.neuron
    if args.neuron_rule == "target":
        return int(weight[args.target_label].argmax())
    if args.neuron_rule == "connected":
        return int(weight.abs().sum(0).argmax())
    gen = torch.Generator().manual_seed(args.seed)
    probe = images[torch.randperm(len(images), generator=gen)[:args.probe_images]]
    gains = patch_response(model, probe).to(weight.device)
    if not (gains > 0).any():
        raise UserError("no feature unit responds to the patch; choose --neuron_rule target or --neuron")
    score = torch.where(gains > 0, weight[args.target_label] * gains, torch.tensor(-float("inf")))
    return int(score.argmax())


def with_patch(images, patch):
    """uint8 (N, 3, H, W) + patch (3, 3, 3) at rows/cols H-7..H-5 -> float [0, 1] (N, 3, H, W), clipped.
    Differentiable in ``patch`` (the same arithmetic as utils.triggers.trojan_trigger, before rounding)."""
    h, w = images.shape[-2:]
    x = images.float()
    rows, cols = slice(h - OFFSET, h - OFFSET + PATCH), slice(w - OFFSET, w - OFFSET + PATCH)
    region = (x[:, :, rows, cols] + patch).clamp(0, 255)
    x = x.clone()
    x[:, :, rows, cols] = region
    return x / 255


@torch.no_grad()
def mean_activation(model, images, patch, neuron, batch_size=512):
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = with_patch(images[i:i + batch_size].to(device), patch)
        total += model.features(x)[:, neuron].sum().item()
    return total / len(images)


@torch.no_grad()
def target_rate(model, images, patch, target, batch_size=512):
    """Share (%) of images the clean model classifies as the target class."""
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(images), batch_size):
        hits += (model(with_patch(images[i:i + batch_size].to(device), patch)).argmax(1) == target).sum().item()
    return 100 * hits / len(images)


def optimise_patch(model, images, neuron, steps, step_size, batch_size, seed):
    """Maximise the mean activation of feature unit ``neuron`` over random batches of ``images`` by
    gradient-sign ascent on the patch (pixel units, cosine-decayed step, kept in [-255, 255])."""
    device = next(model.parameters()).device
    patch = torch.zeros(3, PATCH, PATCH, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        activation = model.features(with_patch(images[idx].to(device), patch))[:, neuron].mean()
        grad, = torch.autograd.grad(activation, patch)
        lr = step_size * 0.5 * (1 + math.cos(math.pi * step / steps))
        with torch.no_grad():
            patch += lr * grad.sign()
            patch.clamp_(-255, 255)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  batch activation {activation.item():.4f}")
    return patch.detach().round()


def main(args):
    validate_args(args)
    if args.dataset == "imagenet":
        raise UserError("the Trojan trigger is defined for 32 x 32 images (CIFAR)")
    torch.manual_seed(args.seed)
    device = resolve_device(args)
    model = load_clean_model(args, device)
    x_train, _, x_test, y_test = load_raw(args)
    for param in model.parameters():
        param.requires_grad_(False)
    neuron = choose_neuron(model, x_train, args)
    zero = torch.zeros(3, PATCH, PATCH, device=device)
    before = mean_activation(model, x_train, zero, neuron)
    print(f"neuron {neuron} ({args.neuron_rule if args.neuron is None else 'given'}; "
          f"weight into the target {model.linear.weight[args.target_label, neuron].item():.4f}); "
          f"mean activation on clean training images: {before:.4f}")

    patch = optimise_patch(model, x_train, neuron, args.steps, args.step_size, args.batch_size, args.seed)

    after = mean_activation(model, x_train, patch, neuron)
    keep = y_test != args.target_label
    rate0, rate1 = (target_rate(model, x_test[keep], p, args.target_label) for p in (zero, patch))
    print(f"activation of neuron {neuron}: {before:.4f} -> {after:.4f} ({100 * (after / before - 1):+.1f}%, "
          f"mean over {len(x_train)} training images)")
    print(f"clean model predicts the target {args.target_label} on {rate0:.2f}% of non-target test images, "
          f"{rate1:.2f}% with the patch")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    patch_np = patch.cpu().numpy().astype(np.int16)
    np.save(out, patch_np)
    print(f"wrote {out} (int16, channel x row x col):\n{patch_np}")
    return {"neuron": neuron, "before": before, "after": after, "patch": patch_np,
            "target_rate_before": rate0, "target_rate_after": rate1}


if __name__ == "__main__":
    run_main(main, build_parser())
