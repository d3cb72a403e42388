"""Plot the FCT histograms of genuinely clean and genuinely poisoned samples (paper Fig. 2 style).

Reads <ckpt>_clean.txt and <ckpt>_poison.txt (from calculate_consistency.py) and, when present,
the thresholds of <ckpt>_gamma.json; writes <ckpt>.jpg. Uses a logarithmic axis when the values
span several decades.
"""
import json
from pathlib import Path

import numpy as np

from utils.args import build_parser as shared_parser
from utils.errors import UserError, run_main
from utils.fct import fct_checkpoint
from utils.paths import fct_prefix
from utils.plots import ATTACK_NAMES, plot_fct


def build_parser():
    return shared_parser(__doc__, groups=("data", "attack", "model", "io", "sd"))


def main(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    prefix = fct_prefix(fct_checkpoint(args))
    files = [Path(f"{prefix}_clean.txt"), Path(f"{prefix}_poison.txt")]
    for f in files:
        if not f.exists():
            raise UserError(f"{f} not found; run calculate_consistency.py with this --checkpoint_load first")
    clean, poison = (np.loadtxt(f, ndmin=1) for f in files)
    gamma_file = Path(f"{prefix}_gamma.json")
    gammas = None
    if gamma_file.exists():
        g = json.loads(gamma_file.read_text())
        gammas = (g["gamma_low"], g["gamma_high"])
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_fct(ax, clean, poison, f"{ATTACK_NAMES.get(args.trigger_type, args.trigger_type)} "
             f"({args.target_type}, {args.poison_rate:g})", gammas)
    fig.tight_layout()
    out = f"{prefix}.jpg"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_main(main, build_parser())
