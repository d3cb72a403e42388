"""Plot the FCT histograms of genuinely clean and genuinely poisoned samples (paper Fig. 2 style).

Reads <ckpt>_clean.txt and <ckpt>_poison.txt (from calculate_consistency.py) and, when present,
the thresholds of <ckpt>_gamma.json; writes <ckpt>.jpg. Uses a logarithmic axis when the values
span several decades.
"""
from pathlib import Path

from utils.args import build_parser as shared_parser, validate_args
from utils.errors import run_main
from utils.fct import fct_checkpoint
from utils.files import read_json, read_txt_values
from utils.paths import fct_outputs
from utils.plots import ATTACK_NAMES, plot_fct


def build_parser():
    return shared_parser(__doc__, groups=("data", "attack", "model", "io", "sd"), step="plot")


def main(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    validate_args(args)
    out = fct_outputs(fct_checkpoint(args))
    what = "the Delta file (run calculate_consistency.py with this --checkpoint_load first)"
    clean, poison = read_txt_values(out["clean"], what), read_txt_values(out["poison"], what)
    gammas = None
    if Path(out["gamma"]).exists():
        g = read_json(out["gamma"], "the thresholds")
        gammas = (g.get("gamma_low"), g.get("gamma_high"))
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_fct(ax, clean, poison, f"{ATTACK_NAMES.get(args.trigger_type, args.trigger_type)} "
             f"({args.target_type}, {args.poison_rate:g})", gammas)
    fig.tight_layout()
    fig.savefig(out["plot"], dpi=120)
    print(f"wrote {out['plot']}")
    return out["plot"]


if __name__ == "__main__":
    run_main(main, build_parser())
