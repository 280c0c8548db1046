"""docs/faults.md names a test for every fault it lists: each named test must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_fault_table_names_exists():
    table = (ROOT / "docs" / "faults.md").read_text()
    named = re.findall(r"`((?:_napari/)?test_\w+\.py)::(test_\w+)(?:\[[^\]]*\])?`", table)
    rows = re.findall(r"^\| \d+[a-z]? \|", table, flags=re.MULTILINE)
    assert len(rows) >= 40 and len(named) == len(rows)
    for file, test in named:
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"^def {test}\(", source, flags=re.MULTILINE), f"{file}::{test} is named but missing"
