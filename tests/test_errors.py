"""User errors end a script with exit status 2 and one `error:` line, no traceback, no output folder."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, SUBPROCESS_ENV, TINY_FLAGS, assert_flag_refused

SCRIPT = REPO_ROOT / "train_attack_noTrans.py"


def bad_data_file(tmp_path):
    path = tmp_path / "wrong_arrays.npz"
    np.savez(path, images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    return ["--dataset", "cifar10", "--data_file", str(path)]


def npz_file(tmp_path, **change):
    """A tiny valid cifar10-shaped data file with some arrays replaced."""
    path = tmp_path / "data.npz"
    arrays = {"x_train": np.zeros((20, 32, 32, 3), np.uint8), "y_train": np.arange(20) % 10,
              "x_test": np.zeros((10, 32, 32, 3), np.uint8), "y_test": np.arange(10)}
    arrays.update(change)
    np.savez(path, **arrays)
    return ["--dataset", "cifar10", "--data_file", str(path)]


def under_a_file(tmp_path):
    (tmp_path / "plain_file").write_text("not a folder")
    return ["--save_root", str(tmp_path / "plain_file" / "saved")]


CASES = {
    "data file with an empty training set": lambda tmp: npz_file(tmp, x_train=np.zeros((0, 32, 32, 3), np.uint8),
                                                                 y_train=np.zeros(0, np.int64)),
    "data file with an empty test set": lambda tmp: npz_file(tmp, x_test=np.zeros((0, 32, 32, 3), np.uint8),
                                                             y_test=np.zeros(0, np.int64)),
    "data file with float labels": lambda tmp: npz_file(tmp, y_train=np.arange(20) % 10 + 0.5),
    "data file with labels out of range": lambda tmp: npz_file(tmp, y_test=np.arange(10) + 5),
    "data file with an object array": lambda tmp: npz_file(tmp, y_train=np.array([None] * 20, dtype=object)),
    "save root under a regular file": under_a_file,
    "unknown trigger": lambda tmp: ["--trigger_type", "rainbowTrigger"],
    "poison rate 0": lambda tmp: ["--poison_rate", "0"],
    "poison rate 1.5": lambda tmp: ["--poison_rate", "1.5"],
    "target label 10 on cifar10": lambda tmp: ["--dataset", "cifar10", "--target_label", "10"],
    "negative target label": lambda tmp: ["--target_label", "-1"],
    "missing checkpoint": lambda tmp: ["--checkpoint_load", str(tmp / "absent.tar")],
    "data file with wrong arrays": bad_data_file,
    "missing data file": lambda tmp: ["--dataset", "cifar10", "--data_file", str(tmp / "absent.npz")],
    "imagenet trigger on cifar10": lambda tmp: ["--dataset", "cifar10", "--trigger_type", "squareTrigger_imagenet"],
    "resume with nothing to resume": lambda tmp: ["--resume"],
}
if not torch.cuda.is_available():
    CASES["cuda asked for without a GPU"] = lambda tmp: ["--device", "cuda"]


def command(case, tmp):
    # TINY_FLAGS first: a case's own --dataset overrides the synthetic default
    return [sys.executable, str(SCRIPT), *TINY_FLAGS, "--epochs", "1", "--save_root", str(tmp / "saved"),
            *CASES[case](tmp)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case at once (each start is mostly the torch import) and collect the results."""
    env = SUBPROCESS_ENV
    tmps = {case: tmp_path_factory.mktemp("case") for case in CASES}
    results = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(subprocess.run, command(case, tmps[case]), cwd=REPO_ROOT, env=env,
                                     capture_output=True, text=True, timeout=300) for case in CASES}
        for case, future in futures.items():
            results[case] = (future.result(), tmps[case] / "saved")
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_and_exit_2(outcomes, case):
    proc, save_root = outcomes[case]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not save_root.exists(), "no output folder for a failed run"


# Refused while parsing (argparse types and Parser.cross_check): exit 2, one line, nothing run.
FLAG_CASES = [
    ("separate_samples", ("--clean_ratio", 0.9, "--poison_ratio", 0.2), "exceed 1"),
    ("calculate_gamma", ("--clean_ratio", 0.9, "--poison_ratio", 0.2), "exceed 1"),
    ("separate_samples", ("--clean_ratio", 0), "--clean_ratio"),
    ("calculate_gamma", ("--poison_ratio", 0), "--poison_ratio"),
    ("unlearn_relearn", ("--clean_ratio", 1), "--clean_ratio"),
    ("calculate_consistency", ("--fct_draws", 0), "--fct_draws"),
    ("train_attack_noTrans", ("--epochs", 0), "--epochs"),
    ("train_attack_withTrans", ("--epochs", -3), "--epochs"),
    ("train_attack_noTrans", ("--batch_size", 0), "--batch_size"),
    ("unlearn_relearn", ("--lr", -1), "--lr"),
    ("train_attack_noTrans", ("--lr", "nan"), "--lr"),
    ("train_attack_noTrans", ("--seed", -1), "--seed"),
    ("train_attack_noTrans", ("--epochs", "ten"), "not an integer"),
    ("train_attack_noTrans", ("--poison_rate", 0), "--poison_rate"),
    ("separate_samples", ("--gamma_low", 2, "--gamma_high", 1), "--gamma_low"),
    ("separate_samples", ("--gamma_low", 2), "both --gamma_low and --gamma_high"),
    ("ST/train_extractor", ("--temp", 0), "--temp"),
    ("ST/train_extractor", ("--batch_size", 0), "--batch_size"),
    ("ST/train_classifier", ("--epochs", 0), "--epochs"),
    ("unlearn_relearn", ("--relearn_passes", 0), "--relearn_passes"),
    ("train_attack_noTrans", ("--target_label", 10), "--target_label"),
    ("train_attack_noTrans", ("--nosuchflag",), "unrecognized arguments"),
]


@pytest.mark.parametrize("script, flags, match", FLAG_CASES, ids=[f"{c[0]} {' '.join(map(str, c[1]))}" for c in FLAG_CASES])
def test_bad_flag_is_refused_while_parsing(capsys, tmp_path, script, flags, match):
    assert_flag_refused(capsys, script, tmp_path / "saved", *flags, match=match)
    assert not (tmp_path / "saved").exists()


def test_parse_error_points_to_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--epochs", "0"], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--help" in proc.stderr, proc.stderr
