"""SD step 4: the thresholds gamma_c and gamma_p from alpha_c and alpha_p (SPEC 3.4).

With the Delta values sorted ascending: gamma_c = value at index floor(alpha_c N), gamma_p =
value at index N - floor(alpha_p N). Prints them and writes <ckpt>_gamma.json, which
separate_samples.py reads when --gamma_low/--gamma_high are not given.
"""
import json
from pathlib import Path

import numpy as np

from utils.args import build_parser as shared_parser
from utils.errors import UserError, run_main
from utils.fct import fct_checkpoint, thresholds
from utils.paths import fct_prefix


def build_parser():
    return shared_parser(__doc__, groups=("data", "attack", "model", "io", "sd"))


def main(args):
    prefix = fct_prefix(fct_checkpoint(args))
    path = Path(f"{prefix}_all.txt")
    if not path.exists():
        raise UserError(f"{path} not found; run calculate_consistency.py with this --checkpoint_load first")
    values = np.loadtxt(path, ndmin=1)
    gamma_c, gamma_p = thresholds(values, args.clean_ratio, args.poison_ratio)
    result = {"gamma_low": gamma_c, "gamma_high": gamma_p, "clean_ratio": args.clean_ratio,
              "poison_ratio": args.poison_ratio, "n": int(len(values)), "fct_file": str(path)}
    Path(f"{prefix}_gamma.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"gamma_c (gamma_low) = {gamma_c}")
    print(f"gamma_p (gamma_high) = {gamma_p}")
    print(f"wrote {prefix}_gamma.json")
    return result


if __name__ == "__main__":
    run_main(main, build_parser())
