"""Find the Trojan (TrojanNN-style) trigger patch against a clean model (SPEC section 1, trojanTrigger).

TrojanNN picks neurons of an internal layer and optimises a trigger patch so that those neurons fire
strongly. Here:

* layer: the penultimate features of the clean model (``model.features``, after the global pool);
* neuron (``--neuron_rule``):
    - ``target`` (default): the feature unit with the largest weight into the target class in the
      linear head, so that driving it also pushes the logit of the attack target;
    - ``connected``: TrojanNN's "most connected" unit, the largest sum of |weights| into all classes;
    - or an explicit ``--neuron J``;
* patch: 3 x 3 x 3 additive values in [-255, 255] at rows/cols H-7..H-5 x W-7..W-5 (25-27 on 32 x 32),
  exactly where ``utils.triggers.trojan_trigger`` adds it; added to the uint8 image and clipped;
* objective: the mean activation of the chosen unit over clean training images, maximised with
  Adam on random mini-batches (step size in pixel units), the patch clipped to [-255, 255] after
  every step and rounded to integers at the end.

Writes ``trigger/trojan_patch.npy`` (int16, (3, 3, 3) = channel x row x col).

    python trigger/make_trojan_trigger.py --data_file X.npz --width 16 --save_root ./saved
"""
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
    g.add_argument("--neuron_rule", default="target", choices=("target", "connected"),
                   help="which feature unit to drive (see the module docstring)")
    g.add_argument("--neuron", type=int, default=None, help="drive this feature unit instead of --neuron_rule")
    g.add_argument("--steps", type=int, default=300, help="optimisation steps")
    g.add_argument("--lr", type=float, default=10.0, help="Adam step size, in pixel units (0..255)")
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


def choose_neuron(model, args):
    """Index of the feature unit to drive (see the module docstring)."""
    weight = model.linear.weight.detach()          # (num_classes, feature_dim)
    if args.neuron is not None:
        if not 0 <= args.neuron < weight.shape[1]:
            raise UserError(f"--neuron must be in 0..{weight.shape[1] - 1}")
        return args.neuron
    if args.neuron_rule == "target":
        return int(weight[args.target_label].argmax())
    return int(weight.abs().sum(0).argmax())


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


def optimise_patch(model, images, neuron, steps, lr, batch_size, seed):
    """Maximise the mean activation of feature unit ``neuron`` over random batches of ``images``."""
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    patch = torch.zeros(3, PATCH, PATCH, device=device, requires_grad=True)
    opt = torch.optim.Adam([patch], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        activation = model.features(with_patch(images[idx].to(device), patch))[:, neuron].mean()
        opt.zero_grad()
        (-activation).backward()
        opt.step()
        with torch.no_grad():
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
    neuron = choose_neuron(model, args)
    zero = torch.zeros(3, PATCH, PATCH, device=device)
    print(f"neuron {neuron} ({args.neuron_rule if args.neuron is None else 'given'}); "
          f"mean activation on clean training images: {mean_activation(model, x_train, zero, neuron):.4f}")

    patch = optimise_patch(model, x_train, neuron, args.steps, args.lr, args.batch_size, args.seed)

    before, after = (mean_activation(model, x_train, p, neuron) for p in (zero, patch))
    keep = y_test != args.target_label
    rate0, rate1 = (target_rate(model, x_test[keep], p, args.target_label) for p in (zero, patch))
    print(f"activation of neuron {neuron}: {before:.4f} -> {after:.4f} (mean over {len(x_train)} training images)")
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
