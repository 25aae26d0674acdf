"""The README's tables are well formed and its checkable counts are true.

Tables: every row of a markdown table has as many cells as its header (a stray row of another table
pasted in is what broke one). Counts: the early-warning figures are those of
``docs/early_warning.md`` (run counts, family counts, every table row), the monitors table and the
recommended preset name what exists, and the two set-up commands name what the package ships.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

import lightning_diag.callbacks

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EARLY_WARNING = (ROOT / "docs" / "early_warning.md").read_text(encoding="utf-8")
MONITORS = lightning_diag.callbacks.__all__  # every monitor the package exports
WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7}


def cells(row: str) -> list[str]:
    """The cells of a markdown table row; ``\\|`` is a pipe inside a cell."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def tables(text: str) -> list[list[str]]:
    """Every markdown table outside code blocks: runs of lines that start with ``|``."""
    found: list[list[str]] = []
    current: list[str] = []
    fenced = False
    for line in [*text.splitlines(), ""]:
        fenced ^= line.startswith("```")
        if line.startswith("|") and not fenced:
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def section(text: str, title: str) -> str:
    """The text of a ``## title`` section, up to the next ``## ``."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert found, f"no section '## {title}'"
    return found.group(1)


def family_rows() -> list[list[str]]:
    """The rows of the "Families" table of docs/early_warning.md (family, kind, ...)."""
    table = section(EARLY_WARNING + "\n## end\n", "Results at the current defaults").split("### Families", 1)[1]
    rows = tables(table)[0]
    return [cells(row) for row in rows[2:]]


def test_table_helpers_count_cells_with_escaped_pipes_and_skip_code_blocks() -> None:
    assert cells(r"| `a` | \|\|w\|\| | b |") == ["`a`", r"\|\|w\|\|", "b"]
    text = "| a | b |\n|---|---|\n| 1 | 2 |\n\n```\n| not | a | table |\n```\n| c |\n"
    assert tables(text) == [["| a | b |", "|---|---|", "| 1 | 2 |"], ["| c |"]]


def test_every_readme_table_has_one_column_count_and_a_separator_row() -> None:
    found = tables(README)
    assert len(found) >= 10, "the README lost its tables"
    for rows in found:
        width = len(cells(rows[0]))
        assert re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", rows[1].replace(" ", "")), rows[:2]
        bad = [(i, len(cells(row))) for i, row in enumerate(rows) if len(cells(row)) != width]
        assert not bad, f"table '{rows[0][:60]}...' has {width} columns; rows (index, columns) {bad}"


def test_readme_family_and_run_counts_are_those_of_the_early_warning_doc() -> None:
    text = section(README, "Early warning: measured out of sample")
    families = family_rows()
    predictable = [row[0] for row in families if row[1] == "predictable"]
    stated = re.search(r"trains (\d+) small runs on\s+the CPU in (\d+) families \((\d+) predictable", text)
    assert stated, "the README no longer states the runs and families of the suite"
    runs, total, scored = map(int, stated.groups())
    assert f"{runs} runs" in EARLY_WARNING
    assert (total, scored) == (len(families), len(predictable)) == (15, 13)
    per_family = next(rows for rows in tables(text) if cells(rows[0])[0] == "detector" and "fp16" in rows[0])
    assert cells(per_family[0])[1:] == predictable  # one column per predictable family, the doc's order


def test_readme_early_warning_rows_are_rows_of_the_early_warning_doc() -> None:
    doc_rows = {row.strip() for rows in tables(EARLY_WARNING) for row in rows}
    readme_tables = tables(section(README, "Early warning: measured out of sample"))
    assert len(readme_tables) == 2
    for rows in readme_tables:
        for row in rows:
            assert row.strip() in doc_rows, f"README row not in docs/early_warning.md: {row[:80]}"


def test_readme_monitors_table_and_recommended_preset_name_what_exists() -> None:
    monitors = section(README, "The monitors")
    listed = [cells(row)[0].strip("`") for row in tables(monitors)[0][2:]]
    assert sorted(listed) == sorted(MONITORS)
    preset = yaml.safe_load((ROOT / "configs" / "recommended.yaml").read_text())["trainer"]["callbacks"]
    in_preset = [spec["class_path"].removeprefix("lightning_diag.") for spec in preset]
    stated = re.search(r"`configs/recommended.yaml` has (.*?):", monitors, re.S)
    assert stated and re.split(r",\s*|\s+and\s+", " ".join(stated.group(1).split())) == in_preset


def test_recommended_preset_header_counts_its_monitors_and_all_of_them() -> None:
    header = (ROOT / "configs" / "recommended.yaml").read_text().split("\ntrainer:")[0]
    preset = yaml.safe_load((ROOT / "configs" / "recommended.yaml").read_text())["trainer"]["callbacks"]
    stated = re.search(r"(\w+) of the (\w+) lightning_diag monitors", header)
    assert stated, header
    assert (WORDS[stated.group(1).lower()], WORDS[stated.group(2)]) == (len(preset), len(MONITORS))
    for name in set(MONITORS) - {s["class_path"].removeprefix("lightning_diag.") for s in preset}:
        assert name in header, f"the preset header does not say why {name} is left out"


def test_readme_setup_commands_name_what_the_package_ships() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert "pip install torch==2.13.0 -e . && python -m lightning_diag.demo" in block
    assert 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest' in block
    assert (ROOT / "lightning_diag" / "demo.py").read_text().rstrip().endswith("raise SystemExit(main())")
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    for needed in ("pytest", "scikit-learn", "matplotlib", "jsonargparse"):  # what the test suite imports
        assert any(d.startswith(needed) for d in dev), needed


def test_readme_runs_saved_rows_are_rows_of_the_runs_saved_doc() -> None:
    """Every row of the README's runs-saved table is a row of ``docs/runs_saved.md`` (the tables the
    benchmark wrote), with the same counts and shares; the README leaves out the median column."""
    doc = (ROOT / "docs" / "runs_saved.md").read_text(encoding="utf-8")
    in_doc = {(c[2], c[3], c[5], c[6], c[7], c[8], c[9]) for table in tables(doc) for c in map(cells, table[2:])
              if len(c) == 11 and c[1] == "all"}
    readme = section(README, "Keeping a run from exploding: StabilityGovernor")
    (table,) = [t for t in tables(readme) if "twin cost" in t[0]]
    rows = [cells(row) for row in table[2:]]
    assert len(rows) >= 8 and all(tuple(c[2:]) in in_doc for c in rows), [c[0] for c in rows if tuple(c[2:]) not in in_doc]
