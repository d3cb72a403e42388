"""benchmarks/paper_scale.py at a tiny size on the CPU: every step measured, the projection's
arithmetic, the epochs from utils/recipes.py, and --jobs 2 as two concurrent worker processes."""
import importlib.util
import math
import os

import pytest

from conftest import COMPILE, REPO_ROOT
from utils import recipes
from utils.args import PAPER_ATTACKS

TINY = ["--width", "4", "--batches", "1", "--warmup", "1", "--device", "cpu", "--jobs", "2", "--compile", COMPILE]


def _load():
    spec = importlib.util.spec_from_file_location("paper_scale", REPO_ROOT / "benchmarks" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    """One tiny run with two concurrent workers: (module, result, printed output)."""
    ps = _load()
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        result = ps.main(ps.build_parser().parse_args(TINY))
    return ps, result, out.getvalue()


def test_every_step_is_measured_with_a_positive_rate(run):
    ps, result, _ = run
    assert set(result["alone"]) == set(ps.MEASURED)
    for name, m in result["alone"].items():
        assert m["images"] > 0 and m["seconds"] > 0 and m["ips"] > 0, name
        assert m["ips"] == pytest.approx(m["images"] / m["seconds"])
    # one timed batch of each script's batch size (eval and dbr: one batch of each of their two parts)
    assert result["alone"]["withTrans"]["images"] == ps.script_args("withTrans").batch_size
    assert result["alone"]["st_extractor"]["images"] == ps.script_args("st_extractor").batch_size
    assert result["alone"]["dbr"]["images"] == 2 * ps.script_args("dbr").batch_size


def test_two_jobs_run_as_two_worker_processes_whose_rates_are_summed(run):
    _, result, _ = run
    workers = result["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert all(w["pid"] != os.getpid() and w["threads"] == 1 for w in workers)
    for name, agg in result["jobs_rate"].items():
        parts = [w["steps"][name]["ips"] for w in workers]
        assert all(p > 0 for p in parts)
        assert agg["ips"] == pytest.approx(sum(parts))
    assert {row["kind"] for row in result["projection"].values()} == set(result["jobs_rate"])  # every rate is used
    for step, row in result["projection"].items():
        assert row["ips_jobs"] == pytest.approx(result["jobs_rate"][row["kind"]]["ips"])
        assert row["ips_alone"] == pytest.approx(result["alone"][row["kind"]]["ips"])


def test_the_projection_is_images_over_the_summed_rate_with_the_recipes_epochs(run):
    ps, result, _ = run
    rows = result["projection"]
    attacks = list(PAPER_ATTACKS.values())
    n = len(attacks)
    assert n == 7
    for step, row in rows.items():
        assert row["minutes"] == pytest.approx(row["images"] / row["ips_jobs"] / 60)
        assert row["minutes_alone"] == pytest.approx(row["images"] / row["ips_alone"] / 60)
    assert result["total_minutes"] == pytest.approx(sum(r["minutes"] for r in rows.values()))
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    assert result["top"] == max(rows, key=lambda s: rows[s]["minutes"])

    epochs = {s: recipes.settings("paper", s)["epochs"] for s in recipes.EPOCH_STEPS}
    assert rows["withTrans"]["epochs"] == epochs["withTrans"] == 200  # the paper's 200 victim epochs
    for step in ("withTrans", "noTrans", "finetune", "dbr", "st_extractor", "st_classifier", "clean_model"):
        assert rows[step]["epochs"] == epochs[step], step
    assert rows["withTrans"]["images"] == epochs["withTrans"] * 50_000 * n
    assert rows["st_extractor"]["images"] == epochs["st_extractor"] * 50_000 * n
    assert rows["clean_model"]["images"] == epochs["clean_model"] * 50_000 * 1  # CL alone trains a clean model
    assert rows["clean_model"]["kind"] == "withTrans"
    dbr = recipes.settings("paper", "dbr")
    split = math.floor(dbr["clean_ratio"] * 50_000) + math.floor(dbr["poison_ratio"] * 50_000)
    assert rows["dbr"]["images"] == epochs["dbr"] * split * n
    assert rows["st_classifier"]["images"] == epochs["st_classifier"] * split * n
    assert rows["fct"]["images"] == 2 * 50_000 * n  # calculate_consistency.py and separate_samples.py
    # every epoch of every evaluating step reads the clean (10,000) and backdoor (9,000; all2all 10,000) test sets
    per_eval = {t: 10_000 + (10_000 if t == "all2all" else 9_000) for t, _, _ in attacks}
    evals = epochs["withTrans"] + epochs["noTrans"] + epochs["finetune"] + epochs["dbr"] + 1
    expected = sum((evals + (epochs["clean_model"] if trig == "fourCornerTrigger" else 0)) * per_eval[t]
                   for t, trig, _ in attacks)
    assert rows["eval"]["images"] == expected
    assert rows["st_eval"]["images"] == sum((epochs["st_classifier"] + 1) * per_eval[t] for t, _, _ in attacks)


def test_the_printed_table_has_a_row_per_step_the_total_and_the_top_step(run):
    _, result, printed = run
    lines = printed.splitlines()
    assert any(line.startswith("| step | epochs x runs | images (M) | img/s (alone) | img/s (2 jobs, sum) |")
               for line in lines)
    for step, row in result["projection"].items():
        cells = next(line for line in lines if line.startswith(f"| {step} |")).split("|")
        assert float(cells[6]) == pytest.approx(row["minutes"], abs=0.06), step
    total = next(line for line in lines if line.startswith("| total |")).split("|")
    assert float(total[6]) == pytest.approx(result["total_minutes"], abs=0.06)
    assert any(line.startswith("total:") and "hours" in line for line in lines)
    assert any(line.startswith(f"where the time goes: {result['top']} ") for line in lines)
