"""The learning-based test assertions' measured values beside their bounds, as a markdown table.

    DBD_MARGINS=margins.jsonl DBD_TEST_THREADS=1 make test          # and DBD_TEST_THREADS=2,
    DBD_MARGINS=margins.jsonl DBD_TEST_AMP=off DBD_TEST_THREADS=1 make test   # DBD_TEST_AMP=off, ...
    python benchmarks/margins_table.py margins.jsonl

One row per assertion, one column per (threads, --amp) configuration that ran it; each cell is
the value measured there (the worst one when a configuration ran it more than once).
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file from any folder

from utils.tables import to_markdown  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("margins", help="the JSON-lines file the tests wrote ($DBD_MARGINS)")
    return p


def worst(values, bound):
    return max(values) if bound.startswith("<") else min(values)


def main(args):
    import pandas as pd
    rows = [json.loads(line) for line in Path(args.margins).read_text().splitlines() if line.strip()]
    cells = {}
    for r in rows:
        test = r["test"].split("::")[-1]
        amp = re.search(r"\[(off|auto|on)\]$", test)   # a test that sets --amp itself names it in its id
        config = f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}, amp {amp.group(1) if amp else r['amp']}"
        key = (re.sub(r"\[(off|auto|on)\]$", "", test), r["what"], r["bound"])
        cells.setdefault(key, {}).setdefault(config, []).append(r["value"])
    configs = sorted({c for v in cells.values() for c in v})
    table = pd.DataFrame([{"test": t, "assertion": f"{what} {bound}",
                           **{c: worst(v[c], bound) if c in v else None for c in configs}}
                          for (t, what, bound), v in cells.items()])
    print(to_markdown(table))
    return table


if __name__ == "__main__":
    main(build_parser().parse_args())
