"""run_all.sh and its report: the report on small fake logs; a tiny quick run that completes and
resumes without redoing finished steps."""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT, SUBPROCESS_ENV, load_script
from utils.args import validate_args
from utils.paths import backdoor_dir, split_dir, st_dir


def _attack_args(save_root, st_root):
    a = argparse.Namespace(dataset="synthetic", data_file=None, model="resnet18", width=16, seed=1000,
                           poison_rate=0.1, target_type="all2one", target_label=0, trigger_type="gridTrigger",
                           clean_ratio=0.2, poison_ratio=0.05, sd_width=None, save_root=str(save_root),
                           st_root=str(st_root))
    return validate_args(a)


def test_report_on_fake_logs(tmp_path):
    a = _attack_args(tmp_path / "saved", tmp_path / "st")
    wt = backdoor_dir(a, "withTrans")
    wt.mkdir(parents=True)
    pd.DataFrame({"Epoch": [0, 1], "Test_ACC": [50.0, 61.5], "Test_ASR": [90.0, 99.25], "Test_ASR0": [3.0, 4.5]}
                 ).to_csv(wt / "log.csv", index=False)
    pd.DataFrame({"Epoch": [-1, 0, 1], "Test_ACC": [61.5, 60.0, 58.0], "Test_ASR": [99.25, 1.0, 12.0],
                  "Test_ASR0": [4.5, 4.0, 3.5]}).to_csv(wt / "unlearn_purify.csv", index=False)
    st = st_dir(a)
    st.mkdir(parents=True)
    pd.DataFrame({"Test_ACC": [44.4], "Test_ASR": [5.5], "Test_ASR0": [5.25], "Test_ACC_nontarget": [43.5]}
                 ).to_csv(st / "test.csv", index=False)
    from utils.st import undefended_dir
    undefended = undefended_dir(a)   # the baseline's run root: no split
    undefended.mkdir(parents=True)
    pd.DataFrame({"Test_ACC": [66.6], "Test_ASR": [97.75], "Test_ASR0": [6.5]}).to_csv(undefended / "test.csv",
                                                                                       index=False)
    split_dir(a).mkdir(parents=True)
    (split_dir(a) / "split_report.json").write_text(json.dumps(
        {"poison_in_clean_set_pct": 0.1, "poison_in_poison_set_pct": 98.5, "auroc": 0.99}))
    ft = backdoor_dir(a, "noTrans_ftsimi")
    ft.mkdir(parents=True)
    (ft / "9.tar").touch()  # the fine-tuned model the FCT files belong to (found by name only)
    np.savetxt(ft / "9_clean.txt", np.random.default_rng(0).gamma(2, 1, 300))
    np.savetxt(ft / "9_poison.txt", 8 + np.random.default_rng(1).random(30))
    times = tmp_path / "times.csv"
    times.write_text("badnets,withTrans,120.0\nbadnets,dbr,30.0\n")
    report = load_script("report_results")
    argv = ["--dataset", "synthetic", "--width", "16", "--save_root", str(tmp_path / "saved"), "--st_root",
            str(tmp_path / "st"), "--attacks", "badnets", "--times", str(times), "--out_dir", str(tmp_path / "res")]
    table = report.main(report.build_parser().parse_args(argv))
    row = table.iloc[0]
    assert row["Attack"] == "BadNets-all2one"
    assert (row["BD ACC"], row["BD ASR"], row["D-BR ACC"], row["D-BR ASR"]) == (61.5, 99.25, 58.0, 12.0)
    assert (row["D-BR best ACC"], row["D-BR best ASR"]) == (60.0, 1.0)      # best ACC - ASR row
    assert (row["D-ST ACC"], row["D-ST ASR"], row["D-ST ASR0"]) == (44.4, 5.5, 5.25)
    assert row["D-ST ACC non-target"] == 43.5
    assert (row["undefended ACC"], row["undefended ASR"], row["undefended ASR0"]) == (66.6, 97.75, 6.5)
    md = (tmp_path / "res" / "synthetic_w16.md").read_text()
    assert "| BadNets-all2one | 61.50 | 99.25 |" in md and "Minutes per step" in md and "2.00" in md
    assert "| 44.40 | 5.50 | 5.25 | 43.50 | 66.60 | 97.75 | 6.50 |" in md and "(--undefended)" in md
    assert (tmp_path / "res" / "synthetic_w16_fct.png").stat().st_size > 10_000
    assert (tmp_path / "res" / "synthetic_w16_dbr.png").stat().st_size > 10_000 and "synthetic_w16_dbr.png" in md


ENV = {**SUBPROCESS_ENV, "PYTHON": sys.executable}


def quick_command(root):
    return ["bash", str(REPO_ROOT / "run_all.sh"), "--quick", "--attacks", "badnets", "--epoch_scale", "0.05",
            "--st_epochs", "1", "--device", "cpu", "--save_root", str(root / "saved"), "--results_dir",
            str(root / "results")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted tiny quick chain (BadNets, synthetic data): (folder, its output)."""
    root = tmp_path_factory.mktemp("quick")
    first = subprocess.run(quick_command(root), capture_output=True, text=True, env=ENV, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    return root, first


def test_run_all_quick_completes_and_resumes(quick_run):
    root, first = quick_run
    cmd = quick_command(root)
    assert "[run]  badnets dst_test" in first.stdout and "[skip]" not in first.stdout
    # one line per finished step: its place, its time, the elapsed time and an estimate of what is left
    done = [line for line in first.stdout.splitlines() if re.match(r"\s+\[\d+/11\] badnets ", line)]
    assert [int(re.search(r"\[(\d+)/", line).group(1)) for line in done] == list(range(1, 12))
    assert all(re.search(r": \d+\.\d s; elapsed \d+m\d\ds, ", line) for line in done)
    assert "about" in done[1] and "left" in done[1] and done[-1].endswith("all steps done")
    # the recipe is recorded with the outputs: in checkpoints and as a column of the CSV logs
    from utils.checkpoint import read_checkpoint
    wt = next((root / "saved" / "backdoored_model").rglob("withTrans/**/log.csv"))
    assert set(pd.read_csv(wt)["Recipe"]) == {"quick"}
    from utils.paths import latest_checkpoint
    ckpt = read_checkpoint(latest_checkpoint(wt.parent))                  # the victim: no D-BR setting in it
    assert ckpt["args"]["recipe"] == "quick" and "ascent_bound" not in ckpt["args"]["recipe_set"]
    assert "ascent_bound=4.6" in read_checkpoint(wt.parent / f"{ckpt['epoch']}_unlearn_purify.tar")["args"]["recipe_set"]
    dbr = pd.read_csv(wt.parent / "unlearn_purify.csv")
    assert set(dbr["Recipe"]) == {"quick"}
    md = (root / "results" / "synthetic.md").read_text()
    assert "BadNets-all2one" in md
    times = (root / "saved" / "run_all" / "synthetic_quick" / "times.csv").read_text().splitlines()
    assert len(times) == 11   # 11 steps: no clean model outside CL
    second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert second.returncode == 0
    assert second.stdout.count("[skip]") == 11 and "[run]" not in second.stdout
    assert (root / "saved" / "run_all" / "synthetic_quick" / "times.csv").read_text().splitlines() == times
    # a step made with another trigger file (its fingerprint is in the .done marker) is not reused
    marker = root / "saved" / "run_all" / "synthetic_quick" / "badnets" / "withTrans.done"
    assert marker.read_text() == ""  # gridTrigger is drawn in code: no file to fingerprint
    marker.write_text("0123456789ab")
    third = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert third.returncode == 2 and "another trigger file" in third.stderr and "[run]" not in third.stdout
    marker.write_text("")


def report_tables(results_dir):
    """The report without its minutes per step (wall time is all that may differ between two runs)."""
    return (results_dir / "synthetic.md").read_text().split("Minutes per step:")[0]


def test_killed_run_all_resumes_to_the_uninterrupted_report(quick_run, tmp_path):
    """SIGKILLs of the whole process group at seeded random points, then a resume: the same report,
    every checkpoint loadable after every kill, each step timed once. Kill k comes a random 0-3 s
    after the chain has finished its n_k-th step (n_k seeded, increasing), so that the chain
    progresses between kills whatever the machine's speed, and the kills land inside steps."""
    from utils.checkpoint import read_checkpoint
    reference, _ = quick_run
    cmd = quick_command(tmp_path)
    times = tmp_path / "saved" / "run_all" / "synthetic_quick" / "times.csv"
    rng = random.Random(1000)
    for steps_done in sorted(rng.sample(range(1, 10), 3)):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        while proc.poll() is None and (not times.exists() or len(times.read_text().splitlines()) < steps_done):
            time.sleep(0.2)
        time.sleep(rng.uniform(0, 3))
        assert proc.poll() is None, "the kill lands before the chain ends"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for ckpt in (tmp_path / "saved").rglob("*.tar"):
            read_checkpoint(ckpt)
    final = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert "[skip]" in final.stdout   # the steps finished before the kills were not redone
    assert report_tables(tmp_path / "results") == report_tables(reference / "results")
    times = (tmp_path / "saved" / "run_all" / "synthetic_quick" / "times.csv").read_text().splitlines()
    assert len(times) == len({tuple(t.split(",")[:2]) for t in times}) == 11


def test_jobs_run_attacks_side_by_side_into_one_report(tmp_path):
    """--jobs_per_gpu 2 on the CPU: two attack chains at once (one torch thread each), one report."""
    cmd = ["bash", str(REPO_ROOT / "run_all.sh"), "--quick", "--attacks", "badnets blend", "--epoch_scale", "0.05",
           "--skip_dst", "--jobs_per_gpu", "2", "--device", "cpu", "--save_root", str(tmp_path / "saved"),
           "--results_dir", str(tmp_path / "results")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    first_done = next(i for i, line in enumerate(lines) if re.match(r"\s+\[1/16\] ", line))
    # both chains start before any step has finished: they run side by side
    assert {"== badnets (gridTrigger, all2one)", "== blend (signalTrigger, all2one)"} <= set(lines[:first_done])
    assert sum(bool(re.match(r"\s+\[\d+/16\] ", line)) for line in lines) == 16
    times = (tmp_path / "saved" / "run_all" / "synthetic_quick" / "times.csv").read_text().splitlines()
    assert sorted({t.split(",")[0] for t in times}) == ["badnets", "blend"] and len(times) == 16
    md = (tmp_path / "results" / "synthetic.md").read_text()
    assert "| BadNets-all2one |" in md and "| Blend-Strip |" in md


def test_second_run_all_on_one_save_root_is_refused(tmp_path):
    import fcntl
    root = tmp_path / "saved"
    root.mkdir()
    with open(root / ".run_all.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        out = subprocess.run(quick_command(tmp_path), capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and "in use by another run_all.sh (process 4242)" in out.stderr, out.stderr
    assert sorted(p.name for p in root.iterdir()) == [".run_all.lock"]


@pytest.mark.parametrize("flags, message", [
    (["--epoch_scale", "abc"], "--epoch_scale must be a positive number"),
    (["--epoch_scale", "0"], "--epoch_scale must be a positive number"),
    (["--attacks"], "--attacks needs a value"),
    (["--attacks", "--quick"], "--attacks needs a value"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--st_epochs", "1.5"], "--st_epochs must be a positive integer"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--dataset", "mnist"], "unknown --dataset"),
    (["--data_file", "absent.npz"], "does not exist"),
    (["--bogus"], "unknown option --bogus"),
    (["--recipe", "fast"], "unknown --recipe 'fast'"),
    (["--jobs_per_gpu", "0"], "--jobs_per_gpu must be a positive integer"),
    (["--gpus", "a b"], "--gpus must be GPU numbers"),
    (["--gpus", "0", "--device", "cpu"], "--gpus asks for GPUs, but --device is cpu"),
    (["--skip_dst", "--skip_dbr"], "leave no defense to run"),
])
def test_run_all_refuses_bad_flags_with_one_line(tmp_path, flags, message):
    out = subprocess.run(["bash", str(REPO_ROOT / "run_all.sh"), "--save_root", str(tmp_path / "saved"), *flags],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "saved").exists()


def test_run_all_rejects_unknown_attack(tmp_path):
    out = subprocess.run(["bash", str(REPO_ROOT / "run_all.sh"), "--attacks", "nosuch", "--save_root",
                          str(tmp_path)], capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 2 and "unknown attack" in out.stderr
    assert not tmp_path.joinpath("run_all").exists()   # nothing written for bad input


def test_nofinetune_recipe_skips_sd_step_2_and_splits_by_the_notrans_model(tmp_path):
    """--recipe full_w16_nofinetune: no L_intra fine-tuning; FCT, the split and its report come from
    the newest noTrans checkpoint; D-BR is the paper's."""
    from utils.checkpoint import read_checkpoint
    from utils.paths import latest_checkpoint
    cmd = ["bash", str(REPO_ROOT / "run_all.sh"), "--recipe", "full_w16_nofinetune", "--dataset", "synthetic",
           "--attacks", "badnets", "--epoch_scale", "0.05", "--skip_dst", "--device", "cpu",
           "--save_root", str(tmp_path / "saved"), "--results_dir", str(tmp_path / "results")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "sd2_finetune" not in out.stdout and "[7/7] badnets dbr" in out.stdout
    models = tmp_path / "saved" / "backdoored_model"
    assert not list(models.rglob("noTrans_ftsimi"))
    no_trans = next(models.rglob("noTrans/**/log.csv")).parent
    newest = latest_checkpoint(no_trans)
    assert (no_trans / f"{newest.stem}_fct.npy").exists()                 # Delta of the noTrans model
    meta = json.loads(next((tmp_path / "saved" / "separated_samples").rglob("split_meta.json")).read_text())
    assert meta["sd_model"] == "noTrans"
    victim = next(models.rglob("withTrans/**/log.csv")).parent
    purified = read_checkpoint(next(victim.glob("*_unlearn_purify.tar")))
    assert purified["args"]["ascent_bound"] is None and purified["args"]["sd_model"] == "noTrans"
    assert "| BadNets-all2one |" in (tmp_path / "results" / "synthetic_full_w16_nofinetune.md").read_text()


def test_skip_dbr_runs_sd_and_dst_without_a_victim(tmp_path):
    """--skip_dbr: D-ST alone. No withTrans victim is trained and no D-BR runs; the SD steps make the
    split, D-ST trains on it, and the report has the D-ST and split columns only."""
    cmd = ["bash", str(REPO_ROOT / "run_all.sh"), "--quick", "--attacks", "badnets", "--epoch_scale", "0.05",
           "--st_epochs", "1", "--skip_dbr", "--device", "cpu", "--save_root", str(tmp_path / "saved"),
           "--results_dir", str(tmp_path / "results")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    done = re.findall(r"\[\d+/(\d+)\] badnets (\w+):", out.stdout)
    assert [name for _, name in done] == ["sd1_noTrans", "sd2_finetune", "sd3_fct", "sd3_plot", "sd4_gamma",
                                          "sd5_split", "dst_extractor", "dst_classifier", "dst_test"]
    assert {total for total, _ in done} == {"9"}
    assert not list((tmp_path / "saved" / "backdoored_model").rglob("withTrans"))
    table = (tmp_path / "results" / "synthetic.md").read_text().split("Published")[0]
    assert "| D-ST ACC | D-ST ASR | D-ST ASR0 |" in table and "BD ACC" not in table and "D-BR ACC" not in table
