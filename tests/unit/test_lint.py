"""The linter and the type checker run with the tests (config in pyproject.toml)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("ruff") is None and not os.environ.get("CI"), reason="ruff not installed")
def test_ruff_is_clean():
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_type_checks():
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy", "realtime")
    assert result.returncode == 0, result.stdout + result.stderr
