"""Every command's failure paths end in a one-line error, never a traceback (issue #13, item 5).

Each case runs one ``actcap`` subcommand (in-process) or a root script (as a subprocess) on a bad
input: a missing file, a folder where a file is expected, a text file named ``.safetensors``, a
misspelled site, a bad layer spec, a folder that is no run, a corrupt ``run.json``, a bad benchmark
spec, a model folder that does not exist, a bad option value. It must exit 1 with one ``Error: ...``
line (actcap's own errors) or 2 with click's or argparse's usage error (bad option syntax).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from actcap.cli.main import cli
from actcap.storage import SampleMeta, save_activations
from tests.conftest import DATA, REPO

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"


@pytest.fixture(scope="module")
def paths(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The good and bad inputs the cases name as ``{key}``: files, folders, a run, a broken run."""
    root = tmp_path_factory.mktemp("failures")
    run = root / "run"
    r = CliRunner().invoke(
        cli,
        ["eval", "--model", str(tiny_model_dir), "--benchmark", f"mmlu:{MMLU}"]
        + ["--limit", "4", "--batch-size", "4", "--out", str(run), "--quiet"],
    )
    assert r.exit_code == 0, r.output
    broken = root / "broken-run"
    shutil.copytree(run, broken)
    (broken / "run.json").write_text('{"version": 1, "config": ')
    good = root / "good.safetensors"
    sites = {"embeddings": torch.randn(3, 32), "layer_0": torch.randn(3, 32)}
    save_activations(good, sites, SampleMeta("p", "r"), input_ids=torch.arange(3))
    text = root / "notes.safetensors"
    text.write_text("these are my notes, not activations\n")
    (root / "empty").mkdir()
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "readme.txt").write_text("hello\n")
    (root / "plain.txt").write_text("hello\n")
    (root / "model.gguf").write_text("not a gguf file\n")
    return {
        "model": str(tiny_model_dir),
        "run": str(run),
        "broken": str(broken),
        "good": str(good),
        "text": str(text),
        "empty": str(root / "empty"),
        "notrun": str(root / "not-a-run"),
        "plain": str(root / "plain.txt"),
        "gguf": str(root / "model.gguf"),
        "missing": str(root / "no-such-thing"),
        "missingfile": str(root / "no-such-file.safetensors"),
        "out": str(root / "out"),
        "mmlu": str(MMLU),
        "root": str(root),
    }


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


USAGE = 2
"""Exit status of a usage error (click's and argparse's): bad option syntax or value."""
ERROR = 1
"""Exit status of actcap's own errors."""

GEN = ["generate", "hi", "--model", "{model}", "--max-new-tokens", "1"]
EVAL = ["eval", "--model", "{model}", "--benchmark", "mmlu:{mmlu}", "--limit", "1", "--quiet"]

# (id, argv with {key} placeholders, expected exit status, text the error line must hold)
CASES: list[tuple[str, list[str], int, str]] = [
    # generate
    ("generate-bad-dtype", [*GEN, "--dtype", "float128"], USAGE, "float128"),
    ("generate-misspelled-site", [*GEN, "--layers", "layer_2.mpl"], ERROR, "layer_2.mlp"),
    ("generate-layer-out-of-range", [*GEN, "--layers", "0-99"], ERROR, "99"),
    ("generate-layer-spec-garbage", [*GEN, "--layers", "first,second"], ERROR, "first"),
    ("generate-bad-site-kind", [*GEN, "--sites", "resid,bogus"], ERROR, "bogus"),
    ("generate-missing-model-folder", [*GEN[:2], "--model", "{missing}/"], ERROR, "no-such"),
    ("generate-text-file-as-gguf", [*GEN[:2], "--model", "{gguf}"], ERROR, "model.gguf"),
    ("generate-save-onto-folder", [*GEN, "--save", "{empty}"], USAGE, "empty"),
    ("generate-bad-device", [*GEN, "--device", "tpu"], ERROR, "tpu"),
    ("generate-zero-new-tokens", [*GEN[:4], "--max-new-tokens", "0"], USAGE, "0"),
    # inspect
    ("inspect-missing-file", ["inspect", "{missingfile}"], ERROR, "no-such-file"),
    ("inspect-text-safetensors", ["inspect", "{text}"], ERROR, "notes.safetensors"),
    ("inspect-empty-folder", ["inspect", "{empty}"], ERROR, "empty"),
    ("inspect-not-a-run", ["inspect", "{notrun}"], ERROR, "not-a-run"),
    ("inspect-corrupt-run-json", ["inspect", "{broken}"], ERROR, "run.json"),
    ("inspect-unknown-sample", ["inspect", "{run}", "--sample", "nosuch"], ERROR, "nosuch"),
    # analyze
    ("analyze-missing-file", ["analyze", "--file", "{missingfile}"], ERROR, "no-such-file"),
    ("analyze-folder-as-file", ["analyze", "--file", "{empty}"], USAGE, "empty"),
    ("analyze-text-safetensors", ["analyze", "--file", "{text}"], ERROR, "notes.safetensors"),
    ("analyze-empty-folder", ["analyze", "--directory", "{empty}"], ERROR, "empty"),
    ("analyze-not-a-run", ["analyze", "--directory", "{notrun}"], ERROR, "not-a-run"),
    ("analyze-corrupt-run-json", ["analyze", "--directory", "{broken}"], ERROR, "run.json"),
    ("analyze-compare-text", ["analyze", "--compare", "{good}", "{text}"], ERROR, "notes"),
    (
        "analyze-unknown-site",
        ["analyze", "--file", "{good}", "--sites", "layer_9"],
        ERROR,
        "layer_9",
    ),
    ("analyze-bad-tokens", ["analyze", "--file", "{good}", "--tokens", "a:b"], USAGE, "a:b"),
    (
        "analyze-empty-token-range",
        ["analyze", "--file", "{good}", "--tokens", "50:60"],
        ERROR,
        "50",
    ),
    ("analyze-nothing-asked", ["analyze"], USAGE, "--file"),
    # export
    (
        "export-unknown-site",
        ["export", "{run}", "--site", "layer_9", "--out", "{out}"],
        ERROR,
        "layer_9",
    ),
    (
        "export-not-a-run",
        ["export", "{notrun}", "--site", "layer_0", "--out", "{out}"],
        ERROR,
        "not-a-run",
    ),
    ("export-bad-format", ["export", "{run}", "--to", "csv", "--out", "{out}"], USAGE, "csv"),
    # verify
    ("verify-empty-folder", ["verify", "{empty}"], ERROR, "empty"),
    ("verify-corrupt-run-json", ["verify", "{broken}"], ERROR, "run.json"),
    ("verify-unknown-sample", ["verify", "{run}", "--samples", "nosuch"], ERROR, "nosuch"),
    ("verify-missing-model", ["verify", "{run}", "--model", "{missing}/"], ERROR, "no-such"),
    # view
    ("view-not-a-run", ["view", "{notrun}", "--no-model"], ERROR, "not-a-run"),
    ("view-bad-port", ["view", "{run}", "--port", "-1"], USAGE, "-1"),
    ("view-port-in-use", ["view", "{run}", "--no-model", "--port", "{port}"], ERROR, "in use"),
    # lens
    ("lens-text-safetensors", ["lens", "{text}"], ERROR, "notes.safetensors"),
    ("lens-token-past-end", ["lens", "{good}", "--token", "99"], ERROR, "99"),
    ("lens-missing-model", ["lens", "{good}", "--model", "{missing}/"], ERROR, "no-such"),
    # plot, probe, report
    ("plot-empty-folder", ["plot", "{empty}", "--out", "{out}"], ERROR, "empty"),
    (
        "plot-unknown-site",
        ["plot", "{run}", "--site", "layer_9", "--out", "{out}"],
        ERROR,
        "layer_9",
    ),
    ("probe-unknown-target", ["probe", "{run}", "--target", "nosuch"], ERROR, "nosuch"),
    ("probe-corrupt-run-json", ["probe", "{broken}"], ERROR, "run.json"),
    ("report-onto-folder", ["report", "{run}", "-o", "{empty}"], USAGE, "empty"),
    ("report-not-a-run", ["report", "{notrun}", "-o", "{out}/r.html"], ERROR, "not-a-run"),
    # eval
    ("eval-unknown-benchmark-kind", [*EVAL[:3], "--benchmark", "bogus:x"], ERROR, "bogus"),
    ("eval-missing-benchmark-file", [*EVAL[:3], "--benchmark", "mmlu:{missing}"], ERROR, "no-such"),
    ("eval-text-benchmark-file", [*EVAL[:3], "--benchmark", "gsm8k:{plain}"], ERROR, "plain.txt"),
    (
        "eval-missing-model-folder",
        ["eval", "--model", "{missing}/", "--out", "{out}"],
        ERROR,
        "no-such",
    ),
    ("eval-bad-dtype", [*EVAL, "--dtype", "float128", "--out", "{out}"], USAGE, "float128"),
    ("eval-layer-out-of-range", [*EVAL, "--layers", "layer_9", "--out", "{out}"], ERROR, "Layer 9"),
    ("eval-out-is-a-file", [*EVAL, "--out", "{plain}"], ERROR, "plain.txt"),
    ("eval-resume-corrupt-run", [*EVAL, "--out", "{broken}", "--resume"], ERROR, "run.json"),
    ("eval-unknown-grader", [*EVAL, "--grader", "fuzzy", "--out", "{out}"], ERROR, "fuzzy"),
]


def fill(argv: list[str], paths: dict[str, str], port: int | None = None) -> list[str]:
    """``argv`` with each ``{key}`` replaced by its path (and ``{port}`` by ``port``)."""
    return [a.format(**paths, port=port) for a in argv]


def check_failure(code: int, stderr: str, expected: int, text: str) -> None:
    """Exit status ``expected``, no traceback, and one ``Error:`` line holding ``text``.

    argparse's usage error is ``main.py: error: ...`` instead.
    """
    assert code == expected, stderr
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error") or ": error: " in ln]
    assert len(errors) == 1, stderr
    if expected == ERROR:  # actcap's own: the error is the only thing said, besides warnings
        said = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning:")]
        assert said == errors, stderr
    assert text in errors[0], stderr


@pytest.mark.parametrize(
    ("argv", "expected", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_command_fails_with_one_line(
    argv: list[str], expected: int, text: str, paths: dict[str, str], request: pytest.FixtureRequest
) -> None:
    port = request.getfixturevalue("busy_port") if "{port}" in argv else None
    argv = fill(argv, paths, port)
    text = text.format(port=port)
    r = CliRunner().invoke(cli, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    check_failure(r.exit_code, r.stderr, expected, text)


SCRIPTS: list[tuple[str, list[str], int, str]] = [
    ("main-unknown-benchmark", ["main.py", "--benchmark", "bogus:x"], ERROR, "bogus"),
    ("main-missing-model", ["main.py", "--model", "{missing}/", "--limit", "1"], ERROR, "no-such"),
    ("main-bad-token-selection", ["main.py", "--token_selection", "first"], USAGE, "first"),
    ("analyze-script-text-file", ["analyze_activations.py", "--file", "{text}"], ERROR, "notes"),
    (
        "analyze-script-not-a-run",
        ["analyze_activations.py", "--directory", "{notrun}"],
        ERROR,
        "not-a-run",
    ),
]


@pytest.mark.parametrize(
    ("argv", "expected", "text"), [c[1:] for c in SCRIPTS], ids=[c[0] for c in SCRIPTS]
)
def test_root_script_fails_with_one_line(
    argv: list[str], expected: int, text: str, paths: dict[str, str]
) -> None:
    script, *args = fill(argv, paths)
    r = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        capture_output=True,
        text=True,
        cwd=paths["root"],
        timeout=120,
    )
    check_failure(r.returncode, r.stderr, expected, text)


def test_lm_eval_unknown_task_is_one_error_line() -> None:
    """lm-eval's own command line: its logging may talk, but the failure is one ``Error:`` line."""
    pytest.importorskip("lm_eval")
    argv = ["lm-eval", "--model", "actcap", "--model_args", "pretrained=default"]
    r = CliRunner().invoke(cli, [*argv, "--tasks", "nosuchtask_xyz"])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == ERROR, r.output
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: lm-eval: ") and "nosuchtask_xyz" in lines[-1], r.stderr
