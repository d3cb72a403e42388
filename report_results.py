"""Collect every run's logs into results/<dataset>.md: the paper's table layout plus split quality,
minutes per step and the FCT histograms of all attacks (results/<dataset>_fct.png).

Reads, for each attack, the paths that utils.paths derives from the same flags run_all.sh used:
the withTrans log.csv (backdoored model), unlearn_purify.csv (D-BR: best-by-test and last rows),
the D-ST test CSV (and the undefended baseline's, --undefended, where it was run), split_report.json
and the FCT text files.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from utils.args import PAPER_ATTACKS as ATTACKS, build_parser as shared_parser, validate_args
from utils.errors import run_main
from utils.fct import sd_model_dir
from utils.paths import REPO_ROOT, backdoor_dir, dataset_tag, fct_outputs, latest_checkpoint, split_dir, st_dir
from utils.recipes import RECIPES
from utils.st import undefended_dir
from utils.tables import to_markdown

PAPER_CIFAR10 = {  # paper-readme.md: backdoored ACC/ASR, D-BR ACC/ASR, D-ST ACC/ASR
    "BadNets-all2one": (91.64, 100.00, 92.83, 0.40, 92.77, 0.03),
    "BadNets-all2all": (92.79, 88.01, 92.61, 0.56, 89.22, 2.05),
    "Trojan": (91.91, 100.00, 92.21, 0.76, 93.72, 0.00),
    "Blend-Strip": (92.09, 99.97, 92.40, 0.06, 93.59, 0.00),
    "Blend-Kitty": (92.69, 99.99, 92.11, 0.14, 91.82, 0.00),
    "SIG": (92.88, 99.69, 92.73, 0.24, 90.07, 0.00),
    "CL": (93.20, 93.34, 92.08, 0.00, 90.46, 6.40),
}


def build_parser():
    p = shared_parser(__doc__, groups=("data", "model", "io", "sd"), step="report")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--times", default=None, help="run_all.sh's times.csv (attack,step,seconds)")
    p.add_argument("--out_dir", default=str(REPO_ROOT / "results"))
    p.add_argument("--st_root", default=None, help="D-ST outputs (default: <save_root>/ST_save)")
    p.add_argument("--note", default=None, help="a line under the title (e.g. the machine and the command)")
    p.add_argument("--name", default=None,
                   help="file name of the table, without .md (default: <dataset tag>_w<width>)")
    return p


def attack_args(args, attack):
    a = argparse.Namespace(**vars(args))
    a.target_type, a.trigger_type, _ = ATTACKS[attack]
    a.poison_rate, a.target_label = 0.1, 0
    return validate_args(a)


def read_csv(path):
    return pd.read_csv(path) if Path(path).exists() else None


def collect(args, attack):
    a = attack_args(args, attack)
    row = {"Attack": ATTACKS[attack][2]}
    cols = ("Test_ACC", "Test_ASR", "Test_ASR0")
    bd = read_csv(backdoor_dir(a, "withTrans") / "log.csv")
    if bd is not None:
        row.update(zip(("BD ACC", "BD ASR", "BD ASR0"), bd.iloc[-1][list(cols)]))
    dbr = read_csv(backdoor_dir(a, "withTrans") / "unlearn_purify.csv")
    if dbr is not None:
        best = dbr.loc[(dbr.Test_ACC - dbr.Test_ASR).idxmax()]
        row.update(zip(("D-BR ACC", "D-BR ASR", "D-BR ASR0"), dbr.iloc[-1][list(cols)]))
        row.update(zip(("D-BR best ACC", "D-BR best ASR"), best[["Test_ACC", "Test_ASR"]]))
        row["D-BR best epoch"] = str(int(best["Epoch"]))
    for name, log in (("BD", bd), ("D-BR", dbr)):  # the paper's ACC: on the test images of other classes
        if log is not None and "Test_ACC_nontarget" in log:
            row[f"{name} ACC non-target"] = log["Test_ACC_nontarget"].iloc[-1]
    for name, path in (("D-ST", st_dir(a)), ("undefended", undefended_dir(a))):   # same extractor budget
        log = read_csv(path / "test.csv")
        if log is not None:
            row.update(zip((f"{name} ACC", f"{name} ASR", f"{name} ASR0"), log.iloc[-1][list(cols)]))
            if "Test_ACC_nontarget" in log:
                row[f"{name} ACC non-target"] = log["Test_ACC_nontarget"].iloc[-1]
    report = split_dir(a) / "split_report.json"
    if report.exists():
        r = json.loads(report.read_text())
        row.update({"poison in D_c %": r["poison_in_clean_set_pct"], "poison in D_p %": r["poison_in_poison_set_pct"],
                    "AUROC": r["auroc"]})
    return row, a, dbr


def fct_files(a):
    """The FCT values (clean, poisoned) of the newest SD model (--sd_model), if it has them."""
    ckpt = latest_checkpoint(sd_model_dir(a))
    if ckpt is None:
        return None
    out = fct_outputs(ckpt)
    files = [Path(out["clean"]), Path(out["poison"])]
    return files if all(f.exists() for f in files) else None


def fct_grid(entries, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.plots import plot_fct  # the same histogram as the per-attack figure
    n = len(entries)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, files) in zip(axes.flat, entries):
        plot_fct(ax, *(np.loadtxt(f, ndmin=1) for f in files), name)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def dbr_curves(logs, out):
    """ACC and ASR (with ASR0) per D-BR epoch, one colour per attack; epoch -1 is the backdoored model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (acc, asr) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, log) in enumerate(logs):
        colour = f"C{i}"
        acc.plot(log.Epoch, log.Test_ACC, color=colour, label=name)
        asr.plot(log.Epoch, log.Test_ASR, color=colour, label=name)
        asr.plot(log.Epoch, log.Test_ASR0, color=colour, linestyle=":", linewidth=1)
    acc.set(xlabel="D-BR epoch (-1: backdoored model)", ylabel="ACC % (whole test split)", title="clean accuracy")
    asr.set(xlabel="D-BR epoch (-1: backdoored model)", ylabel="%", title="ASR (dotted: its base rate ASR0)",
            yscale="symlog", ylim=(0, 100))
    asr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(args):
    validate_args(args)
    rows, entries, curves = [], [], []
    for attack in args.attacks:
        row, a, dbr_log = collect(args, attack)
        rows.append(row)
        if dbr_log is not None:
            curves.append((row["Attack"], dbr_log))
        files = fct_files(a)
        if files:
            entries.append((row["Attack"], files))
    table = pd.DataFrame(rows)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.name or dataset_tag(args) + ("" if args.width == 64 else f"_w{args.width}")
    lines = [f"# Results: {dataset_tag(args)}, ResNet-18 width {args.width}", ""]
    lines += [args.note, ""] if args.note else []
    lines += [f"Recipe `{args.recipe}` (utils/recipes.py): {RECIPES[args.recipe]['about']}.", ""]
    lines += ["ACC on the whole clean test split; ASR on the backdoor test set; ASR0 = how often the model "
             "predicts the attack target on the clean versions of the backdoor test images (its base rate). "
             "D-BR: last epoch (no test-set selection) and, as the paper did, the epoch with the best "
             "ACC - ASR on the test set (chosen by looking at the test set). ACC non-target: on the test images "
             "of the classes other than the target, the ACC the paper reports."]
    if any("undefended ACC" in r for r in rows):
        lines[-1] += (" undefended: the D-ST extractor and classifier at the same budget trained on every sample "
                      "with its label (--undefended), the baseline D-ST is read against.")
    lines += ["", to_markdown(table)]
    if args.dataset == "cifar10":
        paper = pd.DataFrame([{"Attack": k, "BD ACC": v[0], "BD ASR": v[1], "D-BR ACC": v[2], "D-BR ASR": v[3],
                               "D-ST ACC": v[4], "D-ST ASR": v[5]} for k, v in PAPER_CIFAR10.items()])
        lines += ["", "Published (paper-readme.md, full CIFAR-10, width 64; ACC on the 9,000 non-target "
                  "test images):", "", to_markdown(paper)]
    if args.times and Path(args.times).exists():
        t = pd.read_csv(args.times, names=["attack", "step", "seconds"])
        minutes = (t.pivot_table(index="attack", columns="step", values="seconds", aggfunc="last") / 60).round(2)
        lines += ["", "Minutes per step:", "", to_markdown(minutes.reset_index())]
    if entries:
        fct_grid(entries, out_dir / f"{tag}_fct.png")
        lines += ["", f"![FCT histograms]({tag}_fct.png)"]
    if curves:
        dbr_curves(curves, out_dir / f"{tag}_dbr.png")
        lines += ["", f"![D-BR per epoch]({tag}_dbr.png)"]
    (out_dir / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_dir / f'{tag}.md'}")
    return table


if __name__ == "__main__":
    run_main(main, build_parser())
