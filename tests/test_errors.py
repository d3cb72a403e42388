"""User errors end a script with exit status 2 and one `error:` line, no traceback, no output folder."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TINY_FLAGS

SCRIPT = REPO_ROOT / "train_attack_noTrans.py"


def bad_data_file(tmp_path):
    path = tmp_path / "wrong_arrays.npz"
    np.savez(path, images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    return ["--dataset", "cifar10", "--data_file", str(path)]


CASES = {
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
