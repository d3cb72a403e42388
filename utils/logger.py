"""Run logs: a CSV per run (one row per epoch), a header with the git SHA and arguments, and the
progress bar (drawn on a terminal only; a log file gets the scripts' few lines per epoch instead)."""
import csv
import os
import subprocess
from pathlib import Path

from tqdm import tqdm

from utils.files import atomic_write
from utils.paths import REPO_ROOT


class CSVLogger:
    """Append rows to a CSV; a fresh run writes the header, a resumed one appends.

    resume_after=E (a resumed run whose checkpoint holds epoch E): rows of later epochs, written
    by the interrupted run after its last checkpoint, are dropped, so that every epoch is in the
    log exactly once after the resume.
    recipe=NAME adds a last column ``Recipe`` holding the recipe's name on every row (what it set is
    in the run's checkpoints and its printed header). Appending to a log keeps that log's columns."""

    def __init__(self, path, fieldnames, append=False, resume_after=None, recipe=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fieldnames = list(fieldnames) + (["Recipe"] if recipe else [])
        self.recipe = recipe
        if append and self.path.exists():
            with open(self.path, newline="") as f:
                self.fieldnames = next(csv.reader(f), None) or self.fieldnames
        if not (append and self.path.exists()):
            atomic_write(self.path, lambda tmp: self._write_rows(tmp, []))
        elif resume_after is not None:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if _epoch(r) <= resume_after]
            atomic_write(self.path, lambda tmp: self._write_rows(tmp, rows))

    def _write_rows(self, path, rows):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self.fieldnames, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row):
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fieldnames, extrasaction="ignore")
            row = {**row, "Recipe": self.recipe} if self.recipe else row
            w.writerow({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()})


def _epoch(row):
    try:
        return int(float(row.get("Epoch", "")))
    except ValueError:  # a line cut short by a kill
        return float("inf")


def progress(iterable, desc):
    """tqdm on a terminal; nothing elsewhere (CI logs, run_all.sh's step logs), where the scripts'
    per-epoch lines say enough. TQDM_DISABLE=1 turns it off on a terminal too."""
    disable = True if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes") else None
    return tqdm(iterable, desc=desc, leave=False, mininterval=1, disable=disable)


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_header(script, args):
    from utils.args import describe_args
    print(f"{script} (git {git_sha()})")
    if getattr(args, "recipe_set", None):
        print(f"  recipe {args.recipe_set}  (explicit flags win; the values used follow)")
    print("  " + " ".join(f"{k}={v}" for k, v in describe_args(args).items()
                          if k not in ("mean", "std", "recipe_set")))
