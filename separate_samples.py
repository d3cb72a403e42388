"""SD step 5: separate the training set into clean D_c, poisoned D_p and uncertain D_u (SPEC 3.5).

Delta is recomputed in batches with the same seed and per-sample tau as calculate_consistency.py,
so the split agrees with the thresholds. Thresholds:
  * --gamma_low/--gamma_high given: Delta <= gamma_low -> D_c, Delta >= gamma_high -> D_p;
  * otherwise (gamma from alpha_c/alpha_p, read from calculate_gamma.py's JSON when present): the
    floor(alpha_c N) smallest Delta -> D_c and the floor(alpha_p N) largest -> D_p, ties broken by a
    seeded random order (Delta = 0 ties would otherwise put far more than alpha_c N into D_c).
Writes the sets and split_report.json (quality against the ground truth) to the split folder.
"""
import json
from pathlib import Path

import numpy as np

from utils.args import build_parser as shared_parser, describe_args, resolve_device, validate_args
from utils.errors import UserError, run_main
from utils.fct import compute_fct, split_by_rank, split_by_threshold, split_report
from utils.logger import print_header
from utils.paths import dataset_tag, fct_prefix, split_dir
from utils.split import SET_NAMES, save_split
from utils.train import make_runtime

FCT_BATCH = 512


def build_parser():
    return shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), batch_size=FCT_BATCH)


def choose_sets(args, values, prefix):
    """Index sets by the threshold rule (explicit gamma) or by rank (gamma from the ratios)."""
    if args.gamma_low is not None or args.gamma_high is not None:
        if args.gamma_low is None or args.gamma_high is None:
            raise UserError("give both --gamma_low and --gamma_high, or neither")
        print(f"threshold rule: gamma_low {args.gamma_low}, gamma_high {args.gamma_high}")
        return split_by_threshold(values, args.gamma_low, args.gamma_high), "threshold"
    gamma_file = Path(f"{prefix}_gamma.json")
    saved = json.loads(gamma_file.read_text()) if gamma_file.exists() else None
    if saved and (saved["clean_ratio"], saved["poison_ratio"]) == (args.clean_ratio, args.poison_ratio):
        print(f"gamma from {gamma_file}: gamma_c {saved['gamma_low']:.6g}, gamma_p {saved['gamma_high']:.6g}"
              " (applied as ranks of alpha_c, alpha_p)")
    else:
        why = (f"{gamma_file.name} is for alpha_c {saved['clean_ratio']}, alpha_p {saved['poison_ratio']}"
               if saved else f"no {gamma_file.name}")
        print(f"{why}: selecting by the ranks of alpha_c {args.clean_ratio}, alpha_p {args.poison_ratio}")
    sets, ties = split_by_rank(values, args.clean_ratio, args.poison_ratio, args.seed)
    if ties:
        print("warning: equal Delta values straddled a threshold; ties were broken by a seeded random order")
    return sets, "rank"


# settings that change the split but not its folder name: a split made with others is not replaced silently
SPLIT_KEYS = ("trans1", "trans2", "fct_draws", "gamma_low", "gamma_high", "checkpoint_load", "trigger_asset")


def check_earlier_split(folder, args):
    """UserError when ``folder`` holds a split made with other SPLIT_KEYS, unless --overwrite."""
    meta_path = Path(folder) / "split_meta.json"
    if args.overwrite or not meta_path.exists():
        return
    old, new = json.loads(meta_path.read_text()), describe_args(args)
    for key in SPLIT_KEYS:
        if key in old and old[key] != new.get(key):
            raise UserError(f"{folder} holds a split made with --{key} {old[key]} (this run: {new.get(key)}); "
                            "pass --overwrite to replace it, or keep it by using another --save_root")


def main(args):
    validate_args(args)
    if args.batch_size == 1:
        print(f"note: --batch_size 1 is accepted for the original's command line and ignored; "
              f"Delta is computed in batches of {FCT_BATCH}")
        args.batch_size = FCT_BATCH
    check_earlier_split(split_dir(args), args)  # before any work
    rt = make_runtime(args, resolve_device(args))
    print_header("separate_samples.py", args)
    values, train_set, ckpt, seconds = compute_fct(args, rt, args.batch_size)
    prefix = fct_prefix(ckpt)
    saved = Path(f"{prefix}_fct.npy")
    if saved.exists():
        diff = float(np.abs(np.load(saved) - values).max())
        print(f"Delta agrees with calculate_consistency.py's up to {diff:.2g}")
    sets, rule = choose_sets(args, values, prefix)
    report = {**split_report(sets, ~train_set.is_clean.numpy(), values), "rule": rule, "fct_seconds": seconds,
              "checkpoint": str(ckpt),
              # D_c by training label: the rank split over-represents the target class (D-ST learns that as a prior)
              "clean_set_class_counts": np.bincount(train_set.labels.numpy()[sets["clean"]],
                                                    minlength=args.num_classes).tolist()}
    meta = describe_args(args)
    meta["data_tag"] = dataset_tag(args)
    folder = split_dir(args)
    save_split(folder, train_set, sets, report, meta)
    for name, key in (("clean", "clean"), ("poison", "poison"), ("suspicious", "uncertain")):
        print(f"{SET_NAMES[name]}: {len(sets[name]):5d} samples, {report[f'poison_in_{key}_set_pct']:.2f}% poisoned")
    print(f"poison recall of D_p {report['poison_recall_pct']:.2f}%, AUROC of Delta {report['auroc']:.4f}")
    print(f"D_c per class: {report['clean_set_class_counts']}")
    print(f"wrote {folder}")
    return report


if __name__ == "__main__":
    run_main(main, build_parser())
