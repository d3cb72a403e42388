"""Draw ``trigger/preview.png``: one clean and one poisoned image for every CIFAR attack.

Columns: BadNets-all2one (gridTrigger), BadNets-all2all (squareTrigger), Trojan, Blend-Strip,
Blend-Kitty, SIG (training version, delta 40), CL (test version: the four patches only; the
training version also needs PGD against a clean model) and SSBA (the encoder's sample-specific
residual; trigger/ssba_encoder_cifar10.pt unless --ssba_encoder). Rows: the clean image, the poisoned image
and the amplified difference, all upscaled with nearest neighbour so single pixels stay visible.

    python trigger/make_preview.py     # ../shared/data/cifar10_subset.npz if present, else synthetic data
    python trigger/make_preview.py --dataset cifar10 --data_file path/to/cifar10_subset.npz
"""
from pathlib import Path


from dataloader_bd import load_raw
from utils.args import build_parser as shared_parser, validate_args
from utils.errors import UserError, run_main
from utils.triggers import TriggerContext, apply_trigger

HERE = Path(__file__).resolve().parent
# The CIFAR-10 subset where the other commands look for it: ../shared/data beside the checkout.
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cifar10_subset.npz"
ATTACKS = [  # (title, trigger_type, split)
    ("BadNets-all2one\ngridTrigger", "gridTrigger", "train"),
    ("BadNets-all2all\nsquareTrigger", "squareTrigger", "train"),
    ("Trojan\ntrojanTrigger", "trojanTrigger", "train"),
    ("Blend-Strip\nsignalTrigger", "signalTrigger", "train"),
    ("Blend-Kitty\nkittyTrigger", "kittyTrigger", "train"),
    ("SIG (train, δ=40)\nsigTrigger", "sigTrigger", "train"),
    ("CL (test: patches)\nfourCornerTrigger", "fourCornerTrigger", "test"),
    ("SSBA (sample-specific)\nSSBA", "SSBA", "train"),
]


def build_parser():
    have_data = DEFAULT_DATA.exists()
    p = shared_parser(__doc__, groups=("data",), data_file=str(DEFAULT_DATA) if have_data else None,
                      dataset="cifar10" if have_data else "synthetic")
    g = p.add_argument_group("preview")
    g.add_argument("--index", type=int, default=12, help="which test image to poison")
    g.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling factor")
    g.add_argument("--diff_gain", type=float, default=4.0, help="the difference row shows gain x |poisoned - clean|")
    g.add_argument("--blend_image", default=None, help="kittyTrigger: blend this image instead of the cat")
    g.add_argument("--ssba_encoder", default=str(HERE / "ssba_encoder_cifar10.pt"),
                   help="SSBA: the encoder of trigger/train_ssba_encoder.py")
    g.add_argument("--out", default=str(HERE / "preview.png"))
    return p


def upscale(image_chw, scale):
    """uint8 (3, H, W) -> uint8 (H*scale, W*scale, 3) by pixel repetition."""
    hwc = image_chw.permute(1, 2, 0).numpy()
    return hwc.repeat(scale, axis=0).repeat(scale, axis=1)


def main(args):
    validate_args(args)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, _, x_test, y_test = load_raw(args)
    if not 0 <= args.index < len(x_test):
        raise UserError(f"--index must be in 0..{len(x_test) - 1}")
    clean = x_test[args.index:args.index + 1]
    ctx = TriggerContext(blend_image=args.blend_image, ssba_encoder=args.ssba_encoder)
    rows = ["clean", "poisoned", f"|difference| x{args.diff_gain:g}"]
    fig = Figure(figsize=(2.1 * len(ATTACKS), 2.1 * len(rows) + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(ATTACKS))
    for col, (title, name, split) in enumerate(ATTACKS):
        poisoned = apply_trigger(name, clean, split, ctx)
        diff = ((poisoned.float() - clean.float()).abs() * args.diff_gain).clamp(0, 255).round().byte()
        for row, image in enumerate((clean[0], poisoned[0], diff[0])):
            ax = axes[row, col]
            ax.imshow(upscale(image, args.scale), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=11)
            if col == 0:
                ax.set_ylabel(rows[row], fontsize=11)
    source = Path(args.data_file).name if args.data_file else args.dataset
    fig.suptitle(f"Triggers on test image {args.index} (class {int(y_test[args.index])}) of {source}", fontsize=12)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_main(main, build_parser())
