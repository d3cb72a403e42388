"""README.md: its results-at-a-glance table against the committed reports it names, its links, its length.

Pure text parsing (no torch, no training). This code's cells and the paper's cells must each equal the
number of the report row with the same attack name, rounded half-up to the decimals the README shows. A
"—" cell is a run not made yet: allowed only while no report has those numbers for that attack. Adding
an attack to a column is a new report in that column's folder plus its README cells, in the same
commit: rows are found by attack name.
"""
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200
RESULTS_HEADING = "## Results at a glance"
# one report per attack in each folder; every *.md there is read
SOURCE_DIRS = {
    # the paper's SD, D-BR and D-ST classifier on the full CIFAR-10, width 16 (--recipe full_w16)
    "faithful": ROOT / "results" / "cifar10_full_w16",
    # the same with the original code's split rule (--recipe full_w16_threshold), on the same victims
    "threshold": ROOT / "results" / "cifar10_full_w16_threshold",
    # FCT by the noTrans model, no L_intra fine-tuning (--recipe full_w16_nofinetune)
    "nofinetune": ROOT / "results" / "cifar10_full_w16_nofinetune",
    # SD steps 1-5 and D-ST without a victim (no BD or D-BR columns), each with its recipe named
    "dst": ROOT / "results" / "cifar10_full_w16_dst",
}
# paper: the published numbers, as copied into a faithful report's "Published" table
PAPER_REPORT = SOURCE_DIRS["faithful"] / "badnets.md"

# README column -> (source, or sources tried in order, the report's columns in the cell's order "ACC / ASR (ASR0)")
COLUMNS = {
    "paper BD": ("paper", ("BD ACC", "BD ASR")),
    "paper D-BR": ("paper", ("D-BR ACC", "D-BR ASR")),
    "paper D-ST": ("paper", ("D-ST ACC", "D-ST ASR")),
    "BD": ("faithful", ("BD ACC", "BD ASR", "BD ASR0")),
    "D-BR": ("faithful", ("D-BR ACC", "D-BR ASR", "D-BR ASR0")),
    "D-BR, threshold split": ("threshold", ("D-BR ACC", "D-BR ASR", "D-BR ASR0")),
    "D-BR, noTrans SD": ("nofinetune", ("D-BR ACC", "D-BR ASR", "D-BR ASR0")),
    "D-ST": (("faithful", "dst"), ("D-ST ACC", "D-ST ASR", "D-ST ASR0")),
}
NOT_RUN = {"—", "-", ""}
NUMBER = r"(\d+(?:\.\d+)?)"
CELL = re.compile(rf"^{NUMBER} / {NUMBER}(?: \({NUMBER}\))?$")


def markdown_tables(text):
    """Every pipe table of a markdown text, as (header, rows): lists of stripped cell strings."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            tables.append((block[0], block[2:]))
        block = []
    return tables


def rows_by_attack(header, rows):
    return {row[0]: dict(zip(header, row)) for row in rows}


def report_rows(path, published):
    """{attack: {column: value}} of a report's own table (the one with ASR0 columns) or its published table."""
    for header, rows in markdown_tables(path.read_text()):
        if header[0] != "Attack" or not {"BD ACC", "D-ST ACC"} & set(header):
            continue
        if any(h.endswith("ASR0") for h in header) != published:
            return rows_by_attack(header, rows)
    raise AssertionError(f"{path.relative_to(ROOT)}: no {'published' if published else 'results'} table")


def source_rows():
    """{source: {attack: {column: value, "_file": its report}}}: one report per attack in each folder."""
    sources = {}
    for source, folder in SOURCE_DIRS.items():
        rows = sources[source] = {}
        for path in sorted(folder.glob("*.md")):
            for attack, row in report_rows(path, published=False).items():
                assert attack not in rows, f"{attack} is in two reports of {folder.relative_to(ROOT)}"
                rows[attack] = {**row, "_file": path}
    sources["paper"] = {a: {**r, "_file": PAPER_REPORT} for a, r in report_rows(PAPER_REPORT, published=True).items()}
    return sources


def has_numbers(row, report_columns):
    return row is not None and all(row.get(c, "") not in NOT_RUN for c in report_columns)


def results_section(text):
    start = text.index(RESULTS_HEADING)
    end = text.find("\n## ", start + len(RESULTS_HEADING))
    return text[start:end if end != -1 else len(text)]


def readme_table(text):
    tables = markdown_tables(results_section(text))
    assert len(tables) == 1, f"'{RESULTS_HEADING}' must hold exactly one table, found {len(tables)}"
    header, rows = tables[0]
    assert header[0] == "Attack" and set(header[1:]) == set(COLUMNS), header
    return rows_by_attack(header, rows)


def rounded_like(reported, shown):
    """The report's value rounded half-up to the decimals of the README's value."""
    return Decimal(reported).quantize(Decimal(shown), rounding=ROUND_HALF_UP)


def mismatches(text, sources):
    """Every README number that differs from its report, as readable lines; and the files used."""
    problems, used, checked = [], set(), 0
    for attack, cells in readme_table(text).items():
        for column, (source, report_columns) in COLUMNS.items():
            cell = cells[column]
            rows = [sources[s].get(attack) for s in ((source,) if isinstance(source, str) else source)]
            row = next((r for r in rows if has_numbers(r, report_columns)), rows[0])
            if cell in NOT_RUN:
                if has_numbers(row, report_columns):  # a report has them: "not yet run" is stale
                    problems.append(f"{attack} / {column}: README shows '{cell}', but "
                                    f"{row['_file'].relative_to(ROOT)} has the numbers")
                continue
            match = CELL.match(cell)
            shown = [v for v in match.groups() if v is not None] if match else []
            if len(shown) != len(report_columns):
                problems.append(f"{attack} / {column}: '{cell}' is not '{' / '.join(report_columns)}'")
                continue
            if not has_numbers(row, report_columns):
                problems.append(f"{attack} / {column}: no '{attack}' numbers in the {source} reports")
                continue
            used.add(row["_file"])
            for value, name in zip(shown, report_columns):
                reported = row[name]
                checked += 1
                if len(value.partition(".")[2]) > len(reported.partition(".")[2]) \
                        or Decimal(value) != rounded_like(reported, value):
                    problems.append(f"{attack} / {column} / {name}: README {value}, "
                                    f"{row['_file'].relative_to(ROOT)} {reported}")
    assert checked, "no number of the README's table was checked"
    return problems, used


def test_readme_numbers_equal_the_reports():
    problems, _ = mismatches(README.read_text(), source_rows())
    assert not problems, "README's results table disagrees with the reports:\n" + "\n".join(problems)


def test_threshold_reports_share_the_faithful_victims():
    """A threshold-split row is the same victim as the faithful row (only the split differs)."""
    sources = source_rows()
    assert sources["threshold"], "no threshold-split report"
    for attack, row in sources["threshold"].items():
        faithful = sources["faithful"].get(attack)
        assert faithful is not None, f"{attack}: a threshold-split report without a faithful one"
        for column in ("BD ACC", "BD ASR", "BD ASR0"):
            assert row[column] == faithful[column], (attack, column, row["_file"].name)


def test_readme_names_every_report_it_uses():
    text = README.read_text()
    _, used = mismatches(text, source_rows())
    section = results_section(text)
    missing = [str(p.relative_to(ROOT)) for p in sorted(used) if str(p.relative_to(ROOT)) not in section]
    assert not missing, f"name these reports under README's results table: {missing}"


def test_a_changed_number_is_caught():
    """The check is not vacuous: altering any single checked number of the table makes it fail."""
    text, sources = README.read_text(), source_rows()
    table_rows = [line for line in results_section(text).splitlines() if line.startswith("| ") and
                  line.split("|")[1].strip() in readme_table(text)]
    row = next(r for r in table_rows if "(" in r)  # a row with "ours" numbers
    number = re.search(r"\((\d+\.\d+)\)", row).group(1)  # its first ASR0
    changed = row.replace(f"({number})", f"({Decimal(number) + Decimal('0.01')})", 1)
    problems, _ = mismatches(text.replace(row, changed, 1), sources)
    assert problems, "a changed README number went unnoticed"


def test_readme_links_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = [t for t in targets if not re.match(r"[a-z]+://|#", t) and not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_every_docs_file_is_linked():
    text = README.read_text()
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"(docs/{p.name})" not in text]
    assert not unlinked, f"README does not link {unlinked}"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines, more than {MAX_README_LINES}"


@pytest.mark.parametrize("cell, ok", [("62.44 / 100.00 (4.39)", True), ("91.64 / 100.00", True),
                                      ("62.44 / 100.00 4.39", False), ("x / 1", False)])
def test_cell_format(cell, ok):
    assert bool(CELL.match(cell)) == ok
