"""SD step 4: the thresholds gamma_c and gamma_p from alpha_c and alpha_p (SPEC 3.4).

With the Delta values sorted ascending: gamma_c = value at index floor(alpha_c N), gamma_p =
value at index N - floor(alpha_p N). Prints them and writes <ckpt>_gamma.json, which
separate_samples.py reads when --gamma_low/--gamma_high are not given. A JSON made with other
ratios is replaced only with --overwrite.
"""
from utils.args import build_parser as shared_parser, validate_args
from utils.errors import run_main
from utils.fct import fct_checkpoint, thresholds
from utils.files import read_txt_values, refuse_other_settings, save_json
from utils.paths import fct_outputs


def build_parser():
    return shared_parser(__doc__, groups=("data", "attack", "model", "io", "sd"), step="gamma")


def main(args):
    validate_args(args)
    out = fct_outputs(fct_checkpoint(args))
    ratios = {"clean_ratio": args.clean_ratio, "poison_ratio": args.poison_ratio}
    refuse_other_settings(out["gamma"], ratios, args.overwrite, f"the thresholds {out['gamma']}")
    values = read_txt_values(out["all"], "the Delta file (run calculate_consistency.py with this --checkpoint_load first)")
    gamma_c, gamma_p = thresholds(values, args.clean_ratio, args.poison_ratio)
    result = {"gamma_low": gamma_c, "gamma_high": gamma_p, **ratios, "n": int(len(values)), "fct_file": out["all"]}
    save_json(out["gamma"], result)
    print(f"gamma_c (gamma_low) = {gamma_c}")
    print(f"gamma_p (gamma_high) = {gamma_p}")
    print(f"wrote {out['gamma']}")
    return result


if __name__ == "__main__":
    run_main(main, build_parser())
