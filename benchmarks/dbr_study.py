"""D-BR study: run unlearn_relearn.py over a grid of settings on one split and one backdoored model.

Every setting is a string of extra unlearn_relearn.py flags; the grid is their product with
--lrs and --epochs_list. Writes one table (best-by-test row and last row per setting, minutes per
run) as CSV and markdown. Example (CPU scale, BadNets):

  python benchmarks/dbr_study.py --data_file ../shared/data/cifar10_subset.npz --width 16 \
      --lrs 1e-4 3e-4 1e-3 3e-3 --epochs_list 20 200 --out results/dbr_study_grid.md
"""
import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the step scripts live at the repository root

import unlearn_relearn
from utils.tables import to_markdown


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    p.add_argument("--epochs_list", type=int, nargs="+", default=[20, 200])
    p.add_argument("--variants", nargs="+", default=[""],
                   help='extra unlearn_relearn.py flags per variant, e.g. "" "--ascent_bound 3"')
    p.add_argument("--out", default="dbr_study.md", help="markdown table; a .csv is written beside it")
    return p


def run_grid(study, common):
    rows = []
    out_dir = Path(study.out).with_suffix("")
    for variant, lr, epochs in itertools.product(study.variants, study.lrs, study.epochs_list):
        tag = f"lr{lr:g}_e{epochs}" + (("_" + variant.replace("--", "").replace(" ", "")) if variant else "")
        argv = common + shlex.split(variant) + ["--lr", str(lr), "--epochs", str(epochs), "--overwrite",
                                                "--checkpoint_save", str(out_dir / f"{tag}.tar"),
                                                "--log", str(out_dir / f"{tag}.csv")]
        t0 = time.time()
        result = unlearn_relearn.main(unlearn_relearn.build_parser().parse_args(argv))
        minutes = (time.time() - t0) / 60
        for which, m in (("best-by-test", result["best"]["metrics"]), ("last", result["last"])):
            rows.append({"variant": variant or "faithful", "lr": lr, "epochs": epochs, "row": which,
                         "epoch": result["best"]["epoch"] if which == "best-by-test" else epochs - 1,
                         "ACC": m["Test_ACC"], "ASR": m["Test_ASR"], "ASR0": m["Test_ASR0"],
                         "R-ACC": m["Test_R-ACC"], "minutes": minutes})
    return pd.DataFrame(rows)


def main(argv=None):
    study, common = build_parser().parse_known_args(argv)
    table = run_grid(study, common)
    out = Path(study.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    out.write_text(to_markdown(table))
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
