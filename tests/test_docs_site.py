"""The docs site (mkdocs.yml: docs/ and the API reference from the docstrings) builds with warnings as errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.tiny import REPO_ROOT

pytestmark = pytest.mark.slow

for _module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    pytest.importorskip(_module, reason='the docs site needs the docs extra: pip install -e ".[docs]"')


def _mkdocs(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_site_builds_strict_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    out = _mkdocs("--config-file", str(REPO_ROOT / "mkdocs.yml"), "--site-dir", str(site), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    for page in ("design", "losses", "methods"):
        assert (site / page / "index.html").is_file(), page
    api = {page: (site / "api" / page / "index.html").read_text() for page in ("losses", "train", "models")}
    for anchor in ("extkd_jax.losses.kd_kl", "extkd_jax.losses.extended_kd_loss", "extkd_jax.losses.dkd"):
        assert f'id="{anchor}"' in api["losses"], anchor
    for anchor in ("extkd_jax.load", "extkd_jax.train.evaluate.TrainedModel.apply", "extkd_jax.api.reproduce"):
        assert f'id="{anchor}"' in api["train"], anchor
    assert 'id="extkd_jax.models.register_model"' in api["models"]
    assert not (site / "results").exists()  # the experiment reports stay on the repository


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """--strict is what makes the build above a check: a link to a missing page fails it, naming the page."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\ntheme:\n  name: material\n")
    out = _mkdocs("--site-dir", str(tmp_path / "site"), cwd=tmp_path)
    assert out.returncode != 0 and "missing.md" in out.stderr, out.stderr[-2000:]
