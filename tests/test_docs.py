"""The README's result tables are the committed results.json files, rendered (no figure without one behind it)."""

from __future__ import annotations

import re

import pytest

from extkd_jax.experiment.report import readme_table
from extkd_jax.experiment.results import Results
from tests.tiny import REPO_ROOT

BLOCK = re.compile(r"<!-- results: (\S+) -->\n(.*?)\n<!-- /results -->", re.S)


def _blocks():
    return BLOCK.findall((REPO_ROOT / "README.md").read_text())


def test_the_readme_has_result_tables():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("path,table", _blocks(), ids=[p for p, _ in _blocks()])
def test_each_readme_table_is_its_results_json(path, table):
    results = Results.from_json((REPO_ROOT / path).read_text())
    assert table.strip() == readme_table(results)


def test_the_readme_quotes_the_number_of_fault_tests():
    """README's reliability figure is the number of tests `pytest -m fault` collects."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "fault", "--collect-only", "-q", "-p", "no:randomly", "tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    collected = re.search(r"(\d+)/\d+ tests collected", out.stdout)
    assert collected, out.stdout[-2000:]
    n = collected.group(1)
    assert f"injects **{n} faults; all {n} are survived" in (REPO_ROOT / "README.md").read_text()
