"""CI runs every test that needs ../shared: ``.ci/run`` sets ``CI=1``, and with it a checkout
without the official key list fails instead of skipping (tests/official_reference.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_run_sets_ci_before_the_tests():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "export CI=1" in lines
    assert lines.index("export CI=1") < lines.index(".venv/bin/python -m pytest tests")


def _import_reference_without_shared(tmp_path: Path, ci: str):
    """Import a copy of official_reference.py from a folder with no shared/ beside or above it."""
    folder = tmp_path / "checkout" / "tests"
    folder.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "official_reference.py", folder)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "D2INV_OFFICIAL_KEYS")}
    env.update(CI=ci, PYTHONPATH=str(folder))
    code = "import official_reference as R; print('KEYS_JSON', R.KEYS_JSON)"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=folder
    )


def test_missing_shared_fails_under_ci(tmp_path):
    result = _import_reference_without_shared(tmp_path, ci="1")
    assert result.returncode != 0
    assert "FileNotFoundError: CI must run the official-layout tests" in result.stderr


def test_missing_shared_skips_outside_ci(tmp_path):
    result = _import_reference_without_shared(tmp_path, ci="")
    assert result.returncode == 0 and "KEYS_JSON None" in result.stdout
