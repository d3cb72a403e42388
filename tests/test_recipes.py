"""Recipes as data (utils/recipes.py): every step script takes --recipe, an explicit flag wins, the
recipe is recorded, README's settings table is the module's, and no shell or benchmark file holds a
copy of a recipe."""
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_script
from utils import recipes

SCRIPTS = {step: script[:-3] for step, script in recipes.STEPS.items()}


def _parser(step):
    name = SCRIPTS[step]
    if "/" in name:  # ST/ scripts
        import importlib.util
        spec = importlib.util.spec_from_file_location(name.replace("/", "_"), REPO_ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser()
    return load_script(name).build_parser()


@pytest.mark.parametrize("step", list(recipes.STEPS))
def test_every_step_takes_every_recipe_and_an_explicit_flag_wins(step):
    parser = _parser(step)
    for name in recipes.RECIPES:
        args = parser.parse_args(["--recipe", name])
        values = recipes.settings(name, step)
        own = {k: v for k, v in values.items() if hasattr(args, k)}
        assert own, f"{step} takes none of recipe {name}'s settings"
        for key, value in own.items():
            assert getattr(args, key) == value, (step, name, key)
        assert args.recipe == name and args.recipe_set == recipes.describe(name, own)
    # a flag given on the command line beats the recipe, whichever comes first
    assert parser.parse_args(["--width", "8", "--recipe", "quick"]).width == 8
    assert parser.parse_args(["--recipe", "quick", "--width", "8"]).width == 8
    # and parsing again without --recipe gives the paper's values back (the parser keeps no state)
    assert parser.parse_args([]).width == recipes.PAPER["shared"]["width"]


def test_quick_recipe_sets_the_dbr_opt_ins_and_paper_leaves_them_off():
    parser = load_script("unlearn_relearn").build_parser()
    quick, paper = parser.parse_args(["--recipe", "quick"]), parser.parse_args([])
    assert (quick.lr, quick.ascent_bound, quick.lr_schedule, quick.relearn_stamp) == (1e-3, 4.6, "cosine", 0.5)
    assert (paper.lr, paper.epochs, paper.ascent_bound, paper.lr_schedule, paper.relearn_stamp) == \
        (1e-4, 20, None, "constant", 0.0)
    assert (paper.clean_ratio, paper.poison_ratio, paper.trans1, paper.trans2) == (0.2, 0.05, "rotate", "affine")


def test_full_w16_threshold_is_full_w16_with_only_the_split_rule_changed():
    base, changed = recipes.RECIPES["full_w16"], recipes.RECIPES["full_w16_threshold"]
    for step in recipes.STEPS:
        expected = {**recipes.settings("full_w16", step), "split_rule": "threshold"}
        assert recipes.settings("full_w16_threshold", step) == expected, step
    assert base["shared"].get("split_rule") is None  # the paper's rank split
    assert changed["run_all"] == {**base["run_all"], "report": "full_w16_threshold"}  # its own report name
    args = load_script("separate_samples").build_parser().parse_args(["--recipe", "full_w16_threshold"])
    assert (args.split_rule, args.clean_ratio, args.poison_ratio, args.width) == ("threshold", 0.2, 0.05, 16)


def test_unknown_recipe_is_refused_with_one_line(capsys):
    parser = load_script("train_attack_noTrans").build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--recipe", "fast"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--recipe" in err and "quick" in err


def test_help_shows_the_chosen_recipes_defaults():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "unlearn_relearn.py"), "--recipe", "quick", "--help"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120).stdout
    assert re.search(r"--width WIDTH\s.*\(default: 16\)", out, re.S)


def test_epoch_scale_rounds_up_to_at_least_one():
    assert recipes.scaled_epochs(40, 0.05) == 2 and recipes.scaled_epochs(2, 0.05) == 1
    assert recipes.scaled_epochs(20, 1.0) == 20 and recipes.scaled_epochs(10, 0.15) == 2
    lines = dict(line.split("=", 1) for line in recipes.shell("quick", 0.05).splitlines())
    assert lines["EPOCHS[withTrans]"] == "'2'" and lines["EPOCHS[noTrans]"] == "'1'"
    assert all(v == "''" for k, v in (line.split("=", 1) for line in recipes.shell("quick").splitlines())
               if k.startswith("EPOCHS"))   # scale 1: the scripts take the recipe's own counts


def test_readme_settings_table_is_the_modules():
    readme = (REPO_ROOT / "README.md").read_text()
    begin, end = "<!-- recipes:begin -->\n", "\n<!-- recipes:end -->"
    assert begin in readme and end in readme, "README.md lacks the recipes markers"
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table.strip() == recipes.markdown_table().strip(), \
        "README's settings table is stale: run python -m utils.recipes --markdown and paste it between the markers"


# the settings that tell the recipes apart, as a shell or a benchmark would spell them
RECIPE_LITERALS = [r"--ascent_bound\s+4\.6", r"--relearn_stamp\s+0\.5", r"--stamp_jitter", r"--fct_draws\s+4",
                   r"--trans1\s+flip", r"--trans2\s+crop", r"--clean_ratio\s+0\.[25]", r"--lr\s+1e-[34]",
                   r"--schedule\s+(20 30|100 150|10 15)", r"E_WITH=|E_NOTRANS=|E_DBR=|SCHED_WITH="]


def test_run_all_benchmarks_and_report_hold_no_copy_of_a_recipe():
    files = [REPO_ROOT / "run_all.sh", REPO_ROOT / "report_results.py", REPO_ROOT / "Makefile",
             *sorted((REPO_ROOT / "benchmarks").glob("*.py")), *sorted((REPO_ROOT / "benchmarks").glob("*.sh"))]
    for path in files:
        text = path.read_text()
        for literal in RECIPE_LITERALS:
            assert not re.search(literal, text), f"{path.name} spells out a recipe setting ({literal}); read utils/recipes.py"
    run_all = (REPO_ROOT / "run_all.sh").read_text()
    assert "utils.recipes" in run_all and '--recipe "$RECIPE"' in run_all


def test_full_w16_nofinetune_is_full_w16_with_only_the_sd_model_changed():
    for step in recipes.STEPS:
        expected = {**recipes.settings("full_w16", step), "sd_model": "noTrans"}
        assert recipes.settings("full_w16_nofinetune", step) == expected, step
    assert recipes.RECIPES["full_w16_nofinetune"]["run_all"]["report"] == "full_w16_nofinetune"
    # run_all.sh learns from the recipe whether SD step 2 runs
    assert "SD_MODEL='noTrans'" in recipes.shell("full_w16_nofinetune")
    assert "SD_MODEL='finetuned'" in recipes.shell("full_w16") and "SD_MODEL='finetuned'" in recipes.shell("paper")
