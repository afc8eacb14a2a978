"""``python test_activation_capture.py``: the install check at the repository root (issue #13, item 6).

It runs the capture, benchmark and file round-trip checks on the built-in model, prints one line
a check and ``N/M checks passed``, and exits 0 only when all passed. It is a script, not a test
module: pytest must not collect it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "test_activation_capture.py"


def run_script(*args: str, cwd: Path, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script from ``cwd`` (with ``TMPDIR=tmp`` when given)."""
    import os

    env = {**os.environ, **({"TMPDIR": str(tmp)} if tmp else {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_every_check_passes_on_the_built_in_model_and_leaves_no_file(tmp_path):
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    r = run_script("--device", "cpu", cwd=cwd, tmp=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    passes = [line for line in lines if line.startswith("PASS")]
    assert len(passes) == 7 and not any(line.startswith("FAIL") for line in lines), r.stdout
    assert lines[-1] == "7/7 checks passed"
    for what in ("capture", "benchmark answer", "benchmark grade", "round trip"):
        assert any(what in line for line in passes), what
    assert "Traceback" not in r.stderr
    assert list(cwd.iterdir()) == []  # nothing written where it runs
    left = [p.name for p in tmp.iterdir() if p.name.startswith("actcap-check-")]
    assert left == []  # its temp folder is gone (torch may leave its own caches there)


def test_a_failing_check_is_named_and_exits_1(tiny_model_dir, tmp_path):
    """The tiny random model captures and round-trips fine but cannot answer 'Paris'."""
    out = tmp_path / "out"
    r = run_script(
        "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out), cwd=tmp_path
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL  benchmark grade without capture: fact-01 graded False" in r.stdout
    assert r.stdout.count("PASS") == 6 and r.stdout.splitlines()[-1] == "6/7 checks passed"
    assert (out / "round_trip.safetensors").is_file() and (out / "run" / "run.json").is_file()


def test_a_model_that_does_not_load_fails_every_check(tmp_path):
    r = run_script("--model", str(tmp_path / "no-such-model") + "/", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL  load model" in r.stdout and "no-such-model" in r.stdout
    assert r.stdout.splitlines()[-1] == "0/7 checks passed"
    assert "Traceback" not in r.stderr


def test_pytest_does_not_collect_the_script():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            str(SCRIPT),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 5, r.stdout + r.stderr  # 5: no tests collected
    assert "no tests collected" in r.stdout
