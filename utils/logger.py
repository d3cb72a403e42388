"""Run logs: a CSV per run (one row per epoch) and a header with the git SHA and arguments."""
import csv
import subprocess
from pathlib import Path

from utils.paths import REPO_ROOT


class CSVLogger:
    """Append rows to a CSV; a fresh run writes the header, a resumed one appends."""

    def __init__(self, path, fieldnames, append=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fieldnames = list(fieldnames)
        if not (append and self.path.exists()):
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.fieldnames).writeheader()

    def write(self, row):
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fieldnames, extrasaction="ignore")
            w.writerow({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()})


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_header(script, args):
    from utils.args import describe_args
    print(f"{script} (git {git_sha()})")
    print("  " + " ".join(f"{k}={v}" for k, v in describe_args(args).items()
                          if k not in ("mean", "std")))
