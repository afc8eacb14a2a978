"""A smoke run of the benchmark suite at tiny sizes: every section runs and prints its table.

The figures themselves are not asserted (timings are noisy here); docs/performance.md has them.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_suite_quick_run(tmp_path):
    out = tmp_path / "figures.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run_all",
            "--quick",
            "--only",
            "prefill,generate,eval,writer,loading,memory",
            "--json",
            str(out),
            "--tmp",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for heading in (
        "## prefill, batch 1",
        "## prefill, batch 8",
        "## generation, batch 8",
        "## evaluation",
        "## writer",
        "## loading",
        "## peak memory",
    ):
        assert heading in r.stdout
    rows = json.loads(out.read_text())
    sections = {row["section"] for row in rows}
    assert sections == {"prefill", "generate", "eval", "writer", "loading", "memory"}
    actcap = [
        row for row in rows if row["section"] == "prefill" and row["name"].startswith("actcap")
    ]
    assert len(actcap) == 2 and all(row["ratio"] > 0 for row in actcap)
