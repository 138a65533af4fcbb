"""docs/reference_recipes.md's table pins each method's defaults to its reference code: every distilling method has
a row citing a repository, a file and a commit, and every `key=value` in the "ours" column is the config's value
now (a default changed without the table fails here). No JAX: only the config modules are imported."""

from __future__ import annotations

import ast
import importlib
import re

import pytest

from extkd_jax.configs import base
from tests.tiny import REPO_ROOT

DOC = REPO_ROOT / "docs" / "reference_recipes.md"
HEADER = (
    "method",
    "knob",
    "reference value",
    "repository",
    "file (lines)",
    "commit",
    "ours",
    "status",
    "why ours differs",
)
# the methods whose authors published no code: their rows say `none` (searched: docs/reference_recipes.md)
NO_PUBLIC_CODE = {
    "extended_kd",
    "mkd",
    "mtkd_ssr",
    "amkd",
    "pfkd",
    "mismatch",
    "purf_kd",
    "kd_mixup",
    "kd_cutmix",
    "kd_auto",
}
PRESETS = ("digits_omit3", "mnist_omit3", "cifar10_drop")
TOKEN = re.compile(r"`(?:(\w+):)?([A-Za-z_][\w.]*)=([^`]+)`")
FROZEN = ("TWO_VALUE_GRIDS", "INIT_STAGE_FRACTIONS")


def _rows(text: str) -> list[dict[str, str]]:
    """The rows of the table between <!-- recipes --> and <!-- /recipes -->, as dicts keyed by HEADER."""
    match = re.search(r"<!-- recipes -->\n(.*?)\n<!-- /recipes -->", text, re.S)
    assert match, f"{DOC} has no <!-- recipes --> table"
    lines = match.group(1).splitlines()
    header = tuple(c.strip() for c in lines[0].strip().strip("|").split("|"))
    assert header == HEADER, f"table header {header}, expected {HEADER}"
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(HEADER), f"row with {len(cells)} cells, expected {len(HEADER)}: {line}"
        rows.append(dict(zip(HEADER, cells, strict=True)))
    return rows


ROWS = _rows(DOC.read_text())


def _method(row: dict[str, str]) -> str:
    name = row["method"].strip("`")
    assert row["method"] == f"`{name}`", f"method cell {row['method']!r} is not one backticked name"
    return name


def _config_value(preset: str | None, path: str):
    """`path` in base's config (no preset), a preset's config, or base's TWO_VALUE_GRIDS / INIT_STAGE_FRACTIONS."""
    head, *rest = path.split(".")
    if head in FROZEN:
        value = getattr(base, head)
        for key in rest:
            value = value[key]
        return value
    value = importlib.import_module(f"extkd_jax.configs.{preset}").get_config() if preset else base.get_config()
    for key in path.split("."):
        value = value[key]
    return value


def _same(written, actual) -> bool:
    if isinstance(actual, tuple | list):
        return isinstance(written, tuple | list) and len(written) == len(actual) and all(map(_same, written, actual))
    if isinstance(actual, bool) or isinstance(written, bool):
        return written is actual
    if isinstance(actual, int | float):
        return isinstance(written, int | float) and float(written) == float(actual)
    return written == actual


def test_every_distilling_method_has_a_row_citing_its_reference():
    methods = {_method(r) for r in ROWS}
    expected = set(base.DISTILLING_METHODS) | set(base.ZOO_METHODS)
    assert methods == expected, f"missing rows: {sorted(expected - methods)}; unknown: {sorted(methods - expected)}"
    commits: dict[str, str] = {}
    for row in ROWS:
        name = _method(row)
        if name in NO_PUBLIC_CODE:
            assert (row["repository"], row["file (lines)"], row["commit"], row["status"]) == (
                "none",
                "none",
                "none",
                "n/a",
            ), row
            continue
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", row["repository"]), f"{name}: repository {row['repository']!r}"
        assert re.search(r"[\w/.-]+\.(py|md|sh|yaml) \([\d, -]+\)", row["file (lines)"]), f"{name}: {row}"
        assert re.fullmatch(r"[0-9a-f]{40}", row["commit"]), f"{name}: commit {row['commit']!r} is not 40 hex digits"
        # one commit read per repository
        assert commits.setdefault(row["repository"], row["commit"]) == row["commit"], row
        assert row["status"] in ("same", "differs"), f"{name}: status {row['status']!r}"
        if row["status"] == "differs":
            assert row["why ours differs"], f"{name} {row['knob']}: differs without a reason"


def test_every_method_pins_at_least_one_loss_default():
    pinned = {_method(r) for r in ROWS for _, path, _ in TOKEN.findall(r["ours"]) if path.startswith("loss.")}
    assert pinned == {_method(r) for r in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['method'].strip('`')}-{r['knob']}" for r in ROWS])
def test_the_ours_column_is_the_config_now(row):
    tokens = TOKEN.findall(row["ours"])
    for preset, path, written in tokens:
        assert preset in ("", *PRESETS), f"unknown preset {preset!r} in {row['ours']!r}"
        actual = _config_value(preset or None, path)
        value = ast.literal_eval(written)
        where = f"{preset}:{path}" if preset else path
        assert _same(value, actual), f"{_method(row)}: the table says {where}={written}, the config holds {actual!r}"


def test_the_token_check_catches_a_changed_default():
    """The comparison the table relies on tells a changed value apart (and a tuple from a scalar)."""
    assert _same(8.0, 8) and _same((0.1, 1.0), (0.1, 1.0)) and _same(False, False)
    assert not _same(8.0, 0.0) and not _same((0.1, 1.0), (0.1, 10.0)) and not _same(1.0, (1.0,))
    assert not _same(0, False)
