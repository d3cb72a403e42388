"""The files one step hands to the next: a missing, truncated or foreign file is named in a one-line
error before anything is written, and an output made with other settings is never replaced
without --overwrite (on a copy of the suite's tiny SD chain, tests/conftest.py)."""
import json
import shutil

import pytest

from conftest import load_script, parse_script_args
from utils.errors import UserError
from utils.files import lock_folder, unlock_folder
from utils.paths import backdoor_dir, split_dir

RATE = ("--poison_rate", 0.2)


@pytest.fixture
def chain(sd_chain, tmp_path):
    """A private copy of the SD chain's save root, and the folders of its FCT files and split."""
    root = tmp_path / "saved"
    shutil.copytree(sd_chain[0], root)
    args = parse_script_args("calculate_consistency", root, *RATE)
    return root, backdoor_dir(args, "noTrans_ftsimi"), split_dir(args)


def snapshot(folder):
    """Every file below folder with its bytes (lock files aside: they hold only the last holder's pid)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def run(script, root, *flags):
    return load_script(script).main(parse_script_args(script, root, *RATE, *flags))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_fct_made_with_another_tau_or_draw_count_is_not_replaced(chain):
    root, fct, _ = chain
    before = snapshot(fct)
    for flags in (("--trans1", "flip"), ("--fct_draws", 2)):
        with pytest.raises(UserError, match="--overwrite"):
            run("calculate_consistency", root, *flags)
        assert snapshot(fct) == before
    run("calculate_consistency", root)                                 # the same settings: a rerun
    assert snapshot(fct) == before                                     # Delta is reproducible to the byte
    run("calculate_consistency", root, "--trans1", "flip", "--overwrite")
    assert json.loads((fct / "0_fct.json").read_text())["trans1"] == "flip"


def test_gamma_made_with_other_ratios_is_not_replaced(chain):
    root, fct, _ = chain
    before = (fct / "0_gamma.json").read_bytes()
    with pytest.raises(UserError, match="clean_ratio=0.2"):
        run("calculate_gamma", root, "--clean_ratio", 0.3)
    assert (fct / "0_gamma.json").read_bytes() == before
    result = run("calculate_gamma", root, "--clean_ratio", 0.3, "--overwrite")
    assert result["gamma_low"] <= result["gamma_high"] and result["clean_ratio"] == 0.3


@pytest.mark.parametrize("name", ["poison_labels.npy", "clean_samples.npy"])
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_unlearn_relearn_names_a_damaged_split_file(chain, name, damage):
    root, _, split = chain
    load_script("train_attack_withTrans").main(parse_script_args("train_attack_withTrans", root, *RATE, "--epochs", 1,
                                                                           "--overwrite"))
    path = split / name
    path.unlink() if damage == "missing" else truncate(path)
    before = snapshot(root)
    with pytest.raises(UserError, match=name):
        run("unlearn_relearn", root, "--epochs", 1)
    assert snapshot(root) == before


def test_incomplete_split_is_refused(chain):
    root, _, split = chain
    (split / "split_report.json").unlink()   # what a kill during separate_samples.py leaves
    from utils.split import load_split
    with pytest.raises(UserError, match="incomplete"):
        load_split(split, parse_script_args("unlearn_relearn", root, *RATE))


@pytest.mark.parametrize("name, script", [("0_fct.npy", "separate_samples"), ("0_gamma.json", "separate_samples"),
                                          ("0_all.txt", "calculate_gamma"), ("0_clean.txt", "visualize_consistency"),
                                          ("0_gamma.json", "visualize_consistency")])
def test_truncated_fct_file_is_named(chain, name, script):
    root, fct, _ = chain
    path = fct / name
    path.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr'" if name.endswith(".npy") else b"{\"gamma_low\": 0.1, \"gam"
                     if name.endswith(".json") else b"0.25\n0.5\nnot a number\n")
    before = snapshot(root)
    with pytest.raises(UserError, match=name):
        run(script, root, "--overwrite")
    assert snapshot(root) == before


def test_empty_set_is_refused_by_the_threshold_rule(chain):
    root, _, split = chain
    before = snapshot(split)
    with pytest.raises(UserError, match="D_p would be empty"):
        run("separate_samples", root, "--gamma_low", 1e9, "--gamma_high", 1e10, "--overwrite")
    assert snapshot(split) == before


def test_second_process_on_a_run_folder_is_refused(chain):
    """The lock of a training run folder, held here as another process would hold it."""
    root, _, split = chain
    import subprocess
    import sys
    from conftest import REPO_ROOT, SUBPROCESS_ENV, TINY_FLAGS
    folder = backdoor_dir(parse_script_args("train_attack_noTrans", root, *RATE), "noTrans")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from utils.files import lock_folder; lock_folder(sys.argv[2]); print('held', flush=True);"
                               "time.sleep(60)", str(REPO_ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(folder)
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "train_attack_noTrans.py"), *TINY_FLAGS,
                               "--save_root", str(root), *map(str, RATE), "--epochs", "3", "--resume"],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                              env=SUBPROCESS_ENV)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: {folder} is in use by process {holder.pid}; "
                                                    "wait for it to finish or stop it"]
        assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait()
    lock_folder(folder)  # free again once the holder is gone, even though it was killed
    unlock_folder(folder)
