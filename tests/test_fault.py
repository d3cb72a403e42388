"""Kill and resume: real SIGKILLs at seeded random points of a tiny training run, then resumes,
against an uninterrupted run of the same command (the same for run_all.sh: tests/test_run_all.py).

After every kill each checkpoint on disk loads; after the resumes every epoch is in the log exactly
once and the resumed model equals the uninterrupted one bit for bit (the checkpoint holds the random
state of the batch order and augmentation).
"""
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import torch

from conftest import AMP, REPO_ROOT, SUBPROCESS_ENV, TINY_FLAGS
from utils.checkpoint import read_checkpoint

ENV = {**SUBPROCESS_ENV, "PYTHONUNBUFFERED": "1"}
EPOCHS = 6
KILLS = 3


def train_command(save_root, *extra):
    return [sys.executable, str(REPO_ROOT / "train_attack_withTrans.py"), *TINY_FLAGS, "--amp", AMP, "--epochs", str(EPOCHS),
            "--schedule", "3", "--save_freq", "2", "--lr", "0.05", "--save_root", str(save_root), *extra]


def run_folder(save_root):
    return save_root / "backdoored_model" / "poison_rate_0.1" / "withTrans" / "synthetic" / "resnet18_w8" / "gridTrigger"


def kill_after_start(cmd, delay, cwd=REPO_ROOT):
    """Start cmd, wait until it has begun training ('run folder:' on stdout), wait ``delay`` s more, SIGKILL it.
    Returns True when the kill landed before the process ended by itself."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("run folder:"):
            break
    time.sleep(delay)
    landed = proc.poll() is None
    if landed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.stdout.close()
    proc.wait()
    return landed


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_training_resumes_to_the_uninterrupted_model(tmp_path):
    ref_root, root = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(train_command(ref_root), env=ENV, cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    rng = random.Random(20221128)
    landed = 0
    for _ in range(KILLS):
        resume = ["--resume"] if any(run_folder(root).glob("*.tar")) else []
        landed += kill_after_start(train_command(root, *resume), rng.uniform(0.2, 3.0))
        for ckpt in run_folder(root).glob("*.tar"):      # whatever the kill interrupted, no checkpoint is broken
            read_checkpoint(ckpt)
        assert not list(run_folder(root).glob("*.tmp"))  # nor a half-written one left behind
    assert landed >= 2, "the kills should interrupt the run"
    resume = ["--resume"] if any(run_folder(root).glob("*.tar")) else []
    subprocess.run(train_command(root, *resume), env=ENV, cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)

    log = pd.read_csv(run_folder(root) / "log.csv")
    assert log["Epoch"].tolist() == list(range(EPOCHS))
    ref_log = pd.read_csv(run_folder(ref_root) / "log.csv")
    pd.testing.assert_frame_equal(log.drop(columns="Seconds"), ref_log.drop(columns="Seconds"))
    last, ref = read_checkpoint(run_folder(root) / f"{EPOCHS - 1}.tar"), read_checkpoint(run_folder(ref_root) / f"{EPOCHS - 1}.tar")
    assert states_equal(last["model"], ref["model"])
    assert torch.equal(last["rng_state"], ref["rng_state"])
    assert sorted(p.name for p in run_folder(root).glob("*.tar")) == sorted(p.name for p in run_folder(ref_root).glob("*.tar"))
