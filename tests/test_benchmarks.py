"""The benchmark scripts start as the docstrings show them, from any folder."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from conftest import REPO_ROOT, SUBPROCESS_ENV

SCRIPTS = sorted((REPO_ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_script_runs_as_a_file_from_another_folder(tmp_path):
    env = SUBPROCESS_ENV
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(pool.map(lambda s: subprocess.run([sys.executable, str(s), "--help"], cwd=tmp_path, env=env,
                                                       capture_output=True, text=True, timeout=120), SCRIPTS))
    assert len(SCRIPTS) >= 5
    for script, proc in zip(SCRIPTS, procs):
        assert proc.returncode == 0 and "usage" in proc.stdout, f"{script.name}: {proc.stderr[-500:]}"


def test_markdown_table_keeps_small_values_readable():
    import pandas as pd
    from utils.tables import to_markdown
    table = to_markdown(pd.DataFrame({"lr": [1e-3, 0.5, 0.0], "ACC": [61.256, float("nan"), 3.0]}))
    assert table.splitlines()[2:] == ["| 0.001 | 61.26 |", "| 0.50 |  |", "| 0.00 | 3.00 |"]
