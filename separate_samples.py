"""SD step 5: separate the training set into clean D_c, poisoned D_p and uncertain D_u (SPEC 3.5).

Delta is read from calculate_consistency.py's <e>_fct.npy when that file was made from the same
checkpoint with the same settings (<e>_fct.json); otherwise it is computed again, in batches with the
same seed and per-sample tau, so the split agrees with the thresholds either way. Thresholds:
  * --gamma_low/--gamma_high given: Delta <= gamma_low -> D_c, Delta >= gamma_high -> D_p;
  * otherwise (gamma from alpha_c/alpha_p, read from calculate_gamma.py's JSON when present): the
    floor(alpha_c N) smallest Delta -> D_c and the floor(alpha_p N) largest -> D_p, ties broken by a
    seeded random order (Delta = 0 ties would otherwise put far more than alpha_c N into D_c);
  * --split_rule threshold (opt-in, the original code's rule): those gamma applied as thresholds, so
    every Delta = 0 tie joins D_c (the same as passing them as --gamma_low/--gamma_high).
Writes the sets and split_report.json (quality against the ground truth) to the split folder.
"""
from pathlib import Path

import numpy as np

from utils.args import build_parser as shared_parser, describe_args, resolve_device, validate_args
from utils.errors import UserError, run_main
from utils.fct import (compute_fct, fct_checkpoint, fct_settings, load_fct_inputs, split_by_rank, split_by_threshold,
                       split_report, thresholds)
from utils.checkpoint import run_meta
from utils.files import folder_lock, read_json, read_npy, refuse_other_settings
from utils.logger import print_header
from utils.paths import fct_outputs, shown_path, split_dir
from utils.split import SET_NAMES, save_split
from utils.train import make_runtime

FCT_BATCH = 512


def build_parser():
    return shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), step="split",
                         batch_size=FCT_BATCH)


def choose_sets(args, values, gamma_file):
    """Index sets by the threshold rule (explicit gamma) or by rank (gamma from the ratios)."""
    if args.gamma_low is not None:  # the parser makes sure both are given, gamma_low < gamma_high
        print(f"threshold rule: gamma_low {args.gamma_low}, gamma_high {args.gamma_high}")
        sets, rule = split_by_threshold(values, args.gamma_low, args.gamma_high), "threshold"
    elif args.split_rule == "threshold":
        gamma_c, gamma_p = thresholds(values, args.clean_ratio, args.poison_ratio)
        print(f"threshold rule (--split_rule threshold): gamma_c {gamma_c:.6g}, gamma_p {gamma_p:.6g} from alpha_c "
              f"{args.clean_ratio}, alpha_p {args.poison_ratio}")
        sets, rule = split_by_threshold(values, gamma_c, gamma_p), "threshold"
    else:
        saved = read_json(gamma_file, "the thresholds") if gamma_file.exists() else None
        if saved and (saved.get("clean_ratio"), saved.get("poison_ratio")) == (args.clean_ratio, args.poison_ratio):
            print(f"gamma from {gamma_file}: gamma_c {saved['gamma_low']:.6g}, gamma_p {saved['gamma_high']:.6g}"
                  " (applied as ranks of alpha_c, alpha_p)")
        else:
            why = (f"{gamma_file.name} is for alpha_c {saved.get('clean_ratio')}, alpha_p {saved.get('poison_ratio')}"
                   if saved else f"no {gamma_file.name}")
            print(f"{why}: selecting by the ranks of alpha_c {args.clean_ratio}, alpha_p {args.poison_ratio}")
        sets, ties = split_by_rank(values, args.clean_ratio, args.poison_ratio, args.seed)
        if ties:
            print("warning: equal Delta values straddled a threshold; ties were broken by a seeded random order")
        rule = "rank"
    for name, flag in (("clean", "--clean_ratio / --gamma_low"), ("poison", "--poison_ratio / --gamma_high")):
        if len(sets[name]) == 0:
            raise UserError(f"{SET_NAMES[name]} would be empty ({flag} selects none of the {len(values)} samples); "
                            "D-BR and D-ST need both D_c and D_p")
    return sets, rule


# settings that change the split but not its folder name: a split made with others is not replaced silently
SPLIT_KEYS = ("trans1", "trans2", "fct_draws", "gamma_low", "gamma_high", "checkpoint_load", "sd_model",
              "trigger_asset")


def split_rule(args):
    return "threshold" if args.gamma_low is not None or args.split_rule == "threshold" else "rank"


def check_earlier_split(folder, args):
    """UserError when ``folder`` holds a split made with other SPLIT_KEYS or by the other rule (its
    report's ``rule``), unless --overwrite."""
    new = describe_args(args)
    report = folder / "split_report.json"
    refuse_other_settings(folder / "split_meta.json", {k: new.get(k) for k in SPLIT_KEYS}, args.overwrite,
                          f"the split in {folder}", guarded=[report])
    made = read_json(report, "the split report").get("rule") if report.exists() and not args.overwrite else None
    if made not in (None, split_rule(args)):
        raise UserError(f"the split in {folder} was made by the {made} rule (this run: {split_rule(args)}); pass "
                        "--overwrite to replace it, or keep it by using another --save_root")


def delta_is_current(out, ckpt, args):
    """True when calculate_consistency.py's Delta file was made from this checkpoint (written after
    it) with this run's FCT settings, so that the split can use it instead of computing Delta again."""
    stamp = Path(out["settings"])
    if not stamp.exists() or Path(out["values"]).stat().st_mtime < Path(ckpt).stat().st_mtime:
        return False
    return read_json(stamp, "the FCT settings") == fct_settings(args)


def main(args):
    validate_args(args)
    if args.batch_size == 1:
        print(f"note: --batch_size 1 is accepted for the original's command line and ignored; "
              f"Delta is computed in batches of {FCT_BATCH}")
        args.batch_size = FCT_BATCH
    folder = split_dir(args)
    check_earlier_split(folder, args)  # before any work
    ckpt = fct_checkpoint(args)
    out = fct_outputs(ckpt)
    earlier = read_npy(out["values"], "the Delta file") if Path(out["values"]).exists() else None
    if earlier is not None and not delta_is_current(out, ckpt, args):
        earlier = None  # made from another model or with other settings: compute Delta again
    gamma_file = Path(out["gamma"])
    if gamma_file.exists():
        read_json(gamma_file, "the thresholds")  # a damaged file is named now, not after the work
    with folder_lock(folder):
        return _separate(args, folder, ckpt, earlier, gamma_file)


def _separate(args, folder, ckpt, earlier, gamma_file):
    rt = make_runtime(args, resolve_device(args))
    print_header("separate_samples.py", args)
    if earlier is not None:  # calculate_consistency.py's Delta, of this model with these settings
        _, train_set, _ = load_fct_inputs(args, rt, ckpt)
        if earlier.shape != (len(train_set),):
            raise UserError(f"the Delta file beside {ckpt} holds {earlier.shape} values, this training set "
                            f"{len(train_set)}; run calculate_consistency.py again (--overwrite)")
        values, seconds = earlier, 0.0
        print(f"Delta of every training sample read from {fct_outputs(ckpt)['values']} (same model and settings)")
    else:
        values, train_set, _, seconds = compute_fct(args, rt, args.batch_size, checkpoint=ckpt)
    sets, rule = choose_sets(args, values, gamma_file)
    report = {**split_report(sets, ~train_set.is_clean.numpy(), values), "rule": rule, "fct_seconds": seconds,
              "checkpoint": shown_path(ckpt, args),
              # D_c by training label: the rank split over-represents the target class (D-ST learns that as a prior)
              "clean_set_class_counts": np.bincount(train_set.labels.numpy()[sets["clean"]],
                                                    minlength=args.num_classes).tolist()}
    meta = run_meta(args)
    save_split(folder, train_set, sets, report, meta)
    for name, key in (("clean", "clean"), ("poison", "poison"), ("suspicious", "uncertain")):
        print(f"{SET_NAMES[name]}: {len(sets[name]):5d} samples, {report[f'poison_in_{key}_set_pct']:.2f}% poisoned")
    print(f"poison recall of D_p {report['poison_recall_pct']:.2f}%, AUROC of Delta {report['auroc']:.4f}")
    print(f"D_c per class: {report['clean_set_class_counts']}")
    print(f"wrote {folder}")
    return report


if __name__ == "__main__":
    run_main(main, build_parser())
