"""The two builds (README "Building"): the one under test is the one expected, says which it is, and
never runs a compiled module older than its source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import echod.worker.loop
import pytest
from echod import build

ROOT = Path(__file__).resolve().parent.parent
# `make test` names the build each venv must hold, so that a compiler gone missing in CI (setup.py's
# ECHOD_COMPILE=auto then builds interpreted) fails here instead of passing on the wrong build.
EXPECTED = os.environ.get("EXPECT_ECHOD_BUILD", "")


def test_the_expected_build_is_under_test() -> None:
    if EXPECTED == "compiled":
        assert echod.worker.loop.__file__ is not None and echod.worker.loop.__file__.endswith(".so")
        assert build.compiled_modules() == list(build.COMPILED)
    elif EXPECTED == "interpreted":
        assert echod.worker.loop.__file__ is not None and echod.worker.loop.__file__.endswith(".py")
        assert build.compiled_modules() == []
    else:
        assert EXPECTED == "", f"EXPECT_ECHOD_BUILD must be compiled or interpreted, not {EXPECTED!r}"


def test_version_names_the_build() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "echod", "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    word = "compiled" if build.is_compiled() else "interpreted"
    assert out.startswith(f"echod {echod.__version__} ({word}"), out


def test_a_stale_compiled_module_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build.check() is None
    # No record of what the compiled modules were built from: a .so dropped beside edited source.
    monkeypatch.setattr(build, "_recorded", dict)
    if build.is_compiled():
        assert build.stale_modules() == list(build.COMPILED)
        assert "echod.worker.loop" in (build.check() or "")
    else:
        assert build.check() is None  # nothing compiled, nothing stale


def test_the_checkout_holds_no_compiled_module() -> None:
    """A compiled module beside its source would be imported instead of it after an edit."""
    assert not [str(p) for p in (ROOT / "service").rglob("*.so")]


def test_in_place_builds_are_refused() -> None:
    pytest.importorskip("setuptools")  # setup.py's own import; venvs of Python >= 3.12 lack it
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "in-place builds are refused" in done.stderr, done.stderr
