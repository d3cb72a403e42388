"""Split quality of several FCT transformations tau on one existing SD model (SD steps 3-5 without
writing anything): for each tau, Delta of every training sample, the rank split at --clean_ratio /
--poison_ratio, and its quality against the ground truth.

  python -m benchmarks.tau_study --dataset cifar10 --data_file ../shared/data/cifar10_subset.npz \
      --recipe quick --trigger_type kittyTrigger \
      --taus rotate+affine flip+crop crop+none

Takes every flag of calculate_consistency.py (the fine-tuned model is found the same way); --trans1
and --trans2 are replaced by --taus. Prints one row per tau: D_c and D_p % poisoned, poison recall
of D_p, AUROC of Delta. BENCHMARKS.md ("Split quality") shows the tau of the quick recipe chosen this way.
"""
from utils.args import FCT_TRANSFORMS, resolve_device, validate_args
from utils.args import build_parser as shared_parser
from utils.errors import UserError, run_main
from utils.fct import compute_fct, load_fct_inputs, split_by_rank, split_report
from utils.tables import to_markdown
from utils.train import make_runtime


def build_parser():
    p = shared_parser(__doc__, groups=("data", "attack", "model", "optim", "io", "sd"), step="fct",
                       batch_size=512)
    p.add_argument("--taus", nargs="+", default=["rotate+affine", "flip+crop"],
                   help=f"tau as TRANS1+TRANS2 (or one name: TRANS+none); transforms: {', '.join(FCT_TRANSFORMS)}")
    return p


def parse_tau(text):
    names = text.split("+") if "+" in text else [text, "none"]
    if len(names) != 2 or any(n not in FCT_TRANSFORMS for n in names):
        raise UserError(f"--taus: '{text}' is not TRANS1+TRANS2 with transforms from {', '.join(FCT_TRANSFORMS)}")
    return names


def main(args):
    validate_args(args)
    taus = [parse_tau(t) for t in args.taus]
    rt = make_runtime(args, resolve_device(args))
    inputs = load_fct_inputs(args, rt)  # the model and the data once, for every tau
    rows = []
    for trans1, trans2 in taus:
        args.trans1, args.trans2 = trans1, trans2
        values, train_set, ckpt, seconds = compute_fct(args, rt, args.batch_size, inputs)
        sets, _ = split_by_rank(values, args.clean_ratio, args.poison_ratio, args.seed)
        r = split_report(sets, ~train_set.is_clean.numpy(), values)
        rows.append({"tau": f"{trans1} + {trans2}", "D_c % poisoned": round(r["poison_in_clean_set_pct"], 2),
                     "D_p % poisoned": round(r["poison_in_poison_set_pct"], 2),
                     "D_p recall %": round(r["poison_recall_pct"], 2), "AUROC": round(r["auroc"], 4),
                     "seconds": round(seconds, 1)})
    print(f"SD model {ckpt}; alpha_c {args.clean_ratio}, alpha_p {args.poison_ratio}, "
          f"{args.fct_draws} tau draw(s) per sample\n")
    import pandas as pd
    print(to_markdown(pd.DataFrame(rows), digits=3))
    return rows


if __name__ == "__main__":
    run_main(main, build_parser())
