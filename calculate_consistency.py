"""SD step 3: the FCT metric Delta(x; tau, f) of every training sample (SPEC 3.3).

Delta(x) = mean over feature dimensions of (f(x) - f(tau(x)))^2, f = features of the fine-tuned
model (eval mode), tau = --trans1 then --trans2 (default: random rotation up to 180 deg, then a
random translation up to 20 %), each sample with its own parameters drawn from --seed.
Writes <ckpt>_all.txt, <ckpt>_clean.txt, <ckpt>_poison.txt (one value per line),
<ckpt>_fct.npy (Delta by training index) and <ckpt>_fct.json (the settings that made them) next to
the checkpoint. Files made with another tau, draw count or seed are replaced only with --overwrite.
"""
import numpy as np

from utils.args import build_parser as shared_parser, resolve_device, validate_args
from utils.errors import run_main
from utils.fct import auroc, compute_fct, fct_checkpoint, fct_settings
from utils.files import refuse_other_settings, save_json, save_npy, save_txt
from utils.logger import print_header
from utils.paths import fct_outputs
from utils.train import make_runtime


def build_parser():
    return shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), step="fct",
                         batch_size=512)


def save_fct(prefix, values, is_clean, settings):
    """The settings stamp first: a step killed while writing is rerun with the same settings."""
    out = fct_outputs(prefix)
    save_json(out["settings"], settings)
    save_txt(out["all"], values)
    save_txt(out["clean"], values[is_clean])
    save_txt(out["poison"], values[~is_clean])
    save_npy(out["values"], values)


def main(args):
    validate_args(args)
    ckpt = fct_checkpoint(args)
    out, settings = fct_outputs(ckpt), fct_settings(args)
    refuse_other_settings(out["settings"], settings, args.overwrite, f"the Delta files {out['all']}",
                          guarded=[out[k] for k in ("all", "clean", "poison", "values")])
    rt = make_runtime(args, resolve_device(args))
    print_header("calculate_consistency.py", args)
    values, train_set, _, seconds = compute_fct(args, rt, args.batch_size, checkpoint=ckpt)
    is_clean = train_set.is_clean.numpy()
    save_fct(ckpt, values, is_clean, settings)
    print(f"Delta of {len(values)} samples in {seconds:.1f} s (tau = {args.trans1} + {args.trans2})")
    print(f"median Delta: clean {np.median(values[is_clean]):.4g}, poisoned "
          f"{np.median(values[~is_clean]) if (~is_clean).any() else float('nan'):.4g}; "
          f"AUROC {auroc(values, ~is_clean):.4f}")
    print(f"wrote {out['all']}, _clean.txt, _poison.txt, _fct.npy, _fct.json")
    return values


if __name__ == "__main__":
    run_main(main, build_parser())
