"""Run-directory safety and resume (issue #11, items 1-3 and 5-9).

actcap writes only into a new or empty folder or its own run, never through a symbolic link,
reads only files inside a run, gives files the umask's permissions, keeps its lock when
``.lock`` is deleted, and resumes only a run of the same settings whose samples are all whole.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actcap.bench.orchestrator import run_benchmark
from actcap.bench.runner import EvalOptions
from actcap.bench.sources import load_benchmark
from actcap.capture.spec import CaptureSpec
from actcap.cli.main import cli
from actcap.data.export import export_site
from actcap.data.samples import list_samples
from actcap.errors import FormatError, RunError
from actcap.storage import SampleMeta, load_activations, open_run, sample_filename
from actcap.storage.durable import atomic_write_bytes
from actcap.storage.files import save_activations
from actcap.storage.run import RunWriter
from actcap.storage.runconfig import config_differences


def acts(value: float) -> dict[str, torch.Tensor]:
    return {"layer_0": torch.full((2, 4), value)}


def make_run(root: Path, ids: list[str], storage: str = "files") -> Path:
    with RunWriter.open(root, {"model": "m"}, storage=storage) as w:  # type: ignore[arg-type]
        for k, i in enumerate(ids):
            w.write_sample(i, {"correct": True}, acts(float(k)), SampleMeta(prompt=i))
    return root


def manifest_lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


# -- 1. a folder that is not a run is refused; clean-up touches only actcap's own leftovers --


def test_a_foreign_folder_is_refused_and_left_untouched(tmp_path):
    foreign = tmp_path / "other_tool"
    (foreign / "samples").mkdir(parents=True)
    keep = save_activations(foreign / "samples" / "keep.safetensors", acts(1), SampleMeta("x"))
    (foreign / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(foreign) for p in foreign.rglob("*"))
    with pytest.raises(
        RunError, match=r"other_tool: this folder is not empty .* not an actcap run"
    ):
        RunWriter.open(foreign, {"model": "m"})
    with pytest.raises(RunError, match="not an actcap run"):
        RunWriter.open(foreign, {"model": "m"}, resume=True)
    (foreign / "run.json").write_text('{"name": "not actcap"}')  # another tool's run.json
    with pytest.raises(RunError, match="not an actcap run"):
        RunWriter.open(foreign, {"model": "m"}, resume=True)
    (foreign / "run.json").unlink()
    assert sorted(p.relative_to(foreign) for p in foreign.rglob("*")) == before  # no .lock either
    assert keep.is_file() and (foreign / "notes.txt").read_text() == "mine"


def test_cli_eval_refuses_a_foreign_folder(tiny_model_dir, tmp_path):
    foreign = tmp_path / "data"
    (foreign / "samples").mkdir(parents=True)
    (foreign / "samples" / "keep.safetensors").write_bytes(b"someone else's")
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", "demo", "--limit", "1"]
    r = CliRunner().invoke(cli, [*args, "--out", str(foreign), "--quiet"])
    assert r.exit_code == 1 and "not an actcap run" in r.output, r.output
    assert (foreign / "samples" / "keep.safetensors").read_bytes() == b"someone else's"


def test_an_empty_folder_and_a_lock_only_folder_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "empty", ["a"])
    crashed = tmp_path / "crashed"  # killed after taking the lock, before writing run.json
    crashed.mkdir()
    (crashed / ".lock").write_text("123\n")
    (crashed / ".run.json.abcd1234.tmp").write_text("{")
    make_run(crashed, ["a"])
    assert not (crashed / ".run.json.abcd1234.tmp").exists()


def test_cleanup_removes_only_actcap_leftovers(tmp_path):
    run = make_run(tmp_path / "run", ["a", "b"])
    outside = tmp_path / "outside.safetensors"
    save_activations(outside, acts(7), SampleMeta("outside"))
    samples = run / "samples"
    (samples / "orphan.safetensors").write_bytes(b"orphan")  # a crash's unlisted sample
    (samples / ".c.safetensors.1a2b3c4d.tmp").write_bytes(b"partial")
    (samples / "notes.txt").write_text("not actcap's")
    (samples / "link.safetensors").symlink_to(outside)
    (run / "shards").mkdir()
    (run / "shards" / "0123456789ab-00000.shard").write_bytes(b"orphan shard")
    (run / "shards" / "mine.shard").write_bytes(b"not actcap's name")
    (run / ".results.json.0a1b2c3d.tmp").write_text("{")  # actcap's exact temp form
    (run / ".run.json.mine.tmp").write_text("another tool's")
    (run / "user.txt").write_text("keep")
    RunWriter.open(run, {"model": "m"}, resume=True).close()
    assert sorted(p.name for p in samples.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "link.safetensors",
        "notes.txt",
    ]
    assert [p.name for p in (run / "shards").iterdir()] == ["mine.shard"]
    assert not (run / ".results.json.0a1b2c3d.tmp").exists() and (run / "user.txt").exists()
    assert (run / ".run.json.mine.tmp").read_text() == "another tool's"
    assert load_activations(outside)["prompt"] == "outside"


@pytest.mark.parametrize("folder", ["samples", "shards"])
def test_a_symlinked_samples_or_shards_folder_is_never_followed(tmp_path, folder):
    run = make_run(tmp_path / "run", ["a"], storage="files" if folder == "shards" else "shards")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.safetensors").write_bytes(b"precious")
    (elsewhere / "0123456789ab-00000.shard").write_bytes(b"precious")
    (run / folder).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RunError, match=rf"run/{folder}: is a symbolic link"):
        RunWriter.open(run, {"model": "m"}, resume=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == [
        "0123456789ab-00000.shard",
        "precious.safetensors",
    ]


# -- 2. never write through a symbolic link inside a run --


@pytest.mark.parametrize(
    "name", [".lock", "manifest.jsonl", "run.json", "results.json", "manifests/w.jsonl"]
)
def test_no_write_through_a_link_inside_a_run(tmp_path, name):
    run = make_run(tmp_path / "run", ["a"])
    target = tmp_path / "victim.txt"
    target.write_bytes((run / name).read_bytes() if (run / name).is_file() else b"precious\n")
    before = target.read_bytes()
    (run / name).parent.mkdir(exist_ok=True)
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    with (
        pytest.raises(RunError, match=rf"run/{name}: is a symbolic link"),
        RunWriter.open(run, {"model": "m"}, resume=True) as w,
    ):
        w.write_sample("b", {"correct": True}, acts(1), SampleMeta("b"))
        w.write_results({"accuracy": 1.0})
    assert target.read_bytes() == before


def test_links_appearing_during_a_run_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    with RunWriter.open(tmp_path / "run", {"model": "m"}) as w:
        (w.root / "samples").symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(RunError, match="samples: is a symbolic link"):
            w.write_sample("a", {}, acts(1), SampleMeta("a"))
        w.storage = "shards"
        (w.root / "shards").symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(RunError, match="shards: is a symbolic link"):
            w.write_sample("a", {}, acts(1), SampleMeta("a"))
        (w.root / "results.json").symlink_to(victim)
        with pytest.raises(RunError, match="results.json: is a symbolic link"):
            w.write_results({"accuracy": 1.0})
    assert list(elsewhere.iterdir()) == [] and victim.read_text() == "precious"


# -- 3. every path from a manifest stays inside its run --


@pytest.fixture
def hostile_run(tmp_path):
    """A run of two good samples plus four lines pointing at a foreign file outside it."""
    run = make_run(tmp_path / "run", ["good-1", "good-2"])
    foreign = tmp_path / "foreign.safetensors"
    save_activations(foreign, {"layer_0": torch.full((2, 4), 666.0)}, SampleMeta("foreign"))
    (run / "samples" / "link.safetensors").symlink_to(foreign)
    hostile = [
        {"id": "absolute", "file": str(foreign)},
        {"id": "climbs", "file": "../foreign.safetensors"},
        {"id": "hidden-climb", "file": "samples/../../foreign.safetensors"},
        {"id": "link", "file": "samples/link.safetensors"},
        {"id": "shard", "file": str(foreign), "offset": 0, "length": foreign.stat().st_size},
    ]
    with open(run / "manifest.jsonl", "a") as f:
        for line in hostile:
            f.write(json.dumps({**line, "correct": True}) + "\n")
    return run


BAD_IDS = ["absolute", "climbs", "hidden-climb", "link", "shard"]


def test_manifest_paths_outside_the_run_are_skipped_and_reported(hostile_run):
    info = open_run(hostile_run)
    with pytest.warns(UserWarning, match="actcap reads only files inside the run"):
        good = [e.id for e, _ in info.sample_paths()]
    assert good == ["good-1", "good-2"]
    assert [i for i, _ in info.corrupt] == BAD_IDS
    with pytest.warns(UserWarning):
        assert [s.id for s in list_samples(hostile_run)] == ["good-1", "good-2"]
    for sample_id in BAD_IDS:
        with pytest.raises(FormatError, match=rf"sample '{sample_id}' is corrupt"):
            load_activations(hostile_run, sample_id=sample_id)
        r = CliRunner().invoke(cli, ["inspect", str(hostile_run), "--sample", sample_id])
        assert r.exit_code == 1 and "is corrupt" in r.output and "Traceback" not in r.output
    assert load_activations(hostile_run, sample_id="good-2")["prompt"] == "good-2"


def test_export_writes_no_foreign_data(hostile_run, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_site(hostile_run, "layer_0", tmp_path / "out", to="npy")
    assert result.n_samples == 2
    exported = np.load(tmp_path / "out" / "activations.npy")
    assert exported.shape == (4, 4) and not (exported == 666.0).any()
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert ids == ["good-1", "good-2"]


# -- 5. distinct ids, distinct file names, also on a case-insensitive file system --


def test_ids_differing_only_in_case_get_distinct_names(tmp_path):
    ids = ["q1", "Q1", "Abc", "aBC", "abc"]
    names = [sample_filename(i) for i in ids]
    assert len({n.lower() for n in names}) == len(ids)
    run = make_run(tmp_path / "run", ids)
    assert len({e["file"].lower() for e in manifest_lines(run)}) == len(ids)
    for k, i in enumerate(ids):
        assert load_activations(run, sample_id=i)["activations"]["layer_0"][0, 0] == k


def test_an_id_equal_to_another_ids_escaped_form_gets_its_own_name(tmp_path):
    first = "a b"
    second = sample_filename(first).removesuffix(".safetensors")  # 'a_b-<hash>'
    assert sample_filename(first) != sample_filename(second)
    run = make_run(tmp_path / "run", [first, second])
    assert len(list((run / "samples").iterdir())) == 2
    assert load_activations(run, sample_id=first)["prompt"] == first
    assert load_activations(run, sample_id=second)["prompt"] == second


def test_plain_ids_keep_their_names():
    assert sample_filename("mc-01") == "mc-01.safetensors"
    assert sample_filename("high_school_math-0003") == "high_school_math-0003.safetensors"
    for unsafe in ["../x", "/etc/passwd", ".", "..", "con", "a.", "-a", "x" * 200]:
        name = sample_filename(unsafe)
        assert "/" not in name and not name.startswith(".") and len(name) < 120


# -- 6. files get the permissions the umask gives any new file --


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_created_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        run = make_run(tmp_path / "files", ["a"])
        with RunWriter.open(run, {"model": "m"}, resume=True) as w:
            w.write_results({"accuracy": 1.0})
        shards = make_run(tmp_path / "shards", ["a"], storage="shards")
        saved = save_activations(tmp_path / "save.safetensors", acts(1), SampleMeta("x"))
        report = tmp_path / "report.html"
        atomic_write_bytes(report, b"<html></html>")  # how reports are written
    finally:
        os.umask(old)
    made = [
        run / "samples" / "a.safetensors",
        run / "run.json",
        run / "results.json",
        run / "manifest.jsonl",
        run / ".lock",
        *(shards / "shards").iterdir(),
        saved,
        report,
    ]
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in made} == {
        str(p): oct(mode) for p in made
    }


# -- 7. deleting .lock during a run lets no second writer in --


def test_deleting_the_lock_file_lets_no_second_writer_in(tmp_path):
    root = tmp_path / "run"
    with RunWriter.open(root, {"model": "m"}) as first:
        first.write_sample("a", {}, acts(1), SampleMeta("a"))
        (root / ".lock").unlink()
        with pytest.raises(RunError, match="another actcap process"):
            RunWriter.open(root, {"model": "m"}, resume=True)
        first.write_sample("b", {}, acts(2), SampleMeta("b"))
    assert [line["id"] for line in manifest_lines(root)] == ["a", "b"]
    RunWriter.open(root, {"model": "m"}, resume=True).close()  # released with the first


# -- 8. a resume must use the settings of the run --


@pytest.fixture
def demo_run(tiny_lm, tmp_path):
    out = tmp_path / "run"
    run_benchmark(
        tiny_lm,
        load_benchmark("demo"),  # the whole question set, as the CLI passes it
        capture=CaptureSpec(layers=[0]),
        options=EvalOptions(max_new_tokens=2, limit=2),
        out=out,
        progress=False,
    )
    return out


def test_resume_refuses_every_setting_that_changes_answers(tiny_lm, demo_run):
    bench = load_benchmark("demo").limited(3)
    changed = EvalOptions(
        max_new_tokens=3,
        few_shot=1,
        mode="generate",
        grader="exact",
        choice_format="text",
        chat=False,
        overflow="truncate",
    )
    capture = CaptureSpec(
        layers=[0], token_selection="last", dtype="float16", capture_generated=True
    )
    with pytest.raises(RunError) as e:
        run_benchmark(
            tiny_lm,
            bench,
            capture=capture,
            options=changed,
            out=demo_run,
            resume=True,
            progress=False,
        )
    message = str(e.value)
    for flag in [
        "--max-new-tokens",
        "--few-shot",
        "--mode",
        "--grader",
        "--choice-format",
        "chat template setting",
        "--overflow",
        "--token-selection",
        "--dtype",
        "--capture-generated",
    ]:
        assert f"{flag} differs" in message, flag
    assert "\n" not in message and "run.json" in message
    with pytest.raises(RunError, match="--benchmark differs"):
        run_benchmark(
            tiny_lm,
            load_benchmark(f"gsm8k:{Path(__file__).parents[1] / 'data/gsm8k/test.jsonl'}").limited(
                1
            ),
            capture=CaptureSpec(layers=[0]),
            options=EvalOptions(max_new_tokens=2),
            out=demo_run,
            resume=True,
            progress=False,
        )
    with pytest.raises(RunError, match="capture"):
        run_benchmark(
            tiny_lm,
            bench,
            capture=None,
            options=EvalOptions(max_new_tokens=2),
            out=demo_run,
            resume=True,
            progress=False,
        )


def test_resume_accepts_other_batch_size_and_limit(tiny_lm, demo_run):
    result = run_benchmark(
        tiny_lm,
        load_benchmark("demo"),
        capture=CaptureSpec(layers=[0]),
        options=EvalOptions(max_new_tokens=2, batch_size=1, limit=3),
        out=demo_run,
        resume=True,
        progress=False,
    )
    assert result.answered == 1 and len(open_run(demo_run).entries) == 3


def test_a_setting_missing_from_an_old_run_is_accepted():
    old = {"model": "m", "options": {"few_shot": 0}, "capture": {"layers": [0]}}
    new = {
        "model": "m",
        "options": {"few_shot": 0, "overflow": "truncate", "batch_size": 3},
        "capture": {"layers": [0], "dtype": "float16"},
        "sites": ["layer_0"],
    }
    assert config_differences(old, new) == []
    assert config_differences({**old, "options": {"few_shot": 1}}, new) == [
        "--few-shot differs (run: 1, now: 0)"
    ]


# -- 9. a resume redoes finished samples whose file or shard range is missing or damaged --


def test_resume_redoes_a_missing_or_damaged_sample_file(tiny_lm, tmp_path):
    bench = load_benchmark("demo").limited(4)
    opts = EvalOptions(max_new_tokens=2)
    out = tmp_path / "run"
    run_benchmark(
        tiny_lm, bench, capture=CaptureSpec(layers=[0]), options=opts, out=out, progress=False
    )
    first, second = (out / e["file"] for e in manifest_lines(out)[:2])
    first.unlink()
    second.write_bytes(second.read_bytes()[:100])  # cut short
    with pytest.warns(UserWarning, match="2 finished sample"):
        result = run_benchmark(
            tiny_lm,
            bench,
            capture=CaptureSpec(layers=[0]),
            options=opts,
            out=out,
            resume=True,
            progress=False,
        )
    assert result.answered == 2
    ids = [line["id"] for line in manifest_lines(out)]
    assert Counter(ids) == Counter(q.id for q in bench.questions)
    for q in bench.questions:
        assert load_activations(out, sample_id=q.id)["activations"]["layer_0"].numel() > 0


def test_resume_redoes_samples_of_a_cut_shard(tiny_lm, tmp_path):
    bench = load_benchmark("demo").limited(4)
    opts = EvalOptions(max_new_tokens=2)
    out = tmp_path / "run"
    kw = {"capture": CaptureSpec(layers=[0]), "options": opts, "out": out, "progress": False}
    run_benchmark(tiny_lm, bench, storage="shards", **kw)
    last = manifest_lines(out)[-1]
    shard = out / last["file"]
    with open(shard, "r+b") as f:
        f.truncate(last["offset"] + last["length"] // 2)
    with pytest.warns(UserWarning, match="1 finished sample"):
        result = run_benchmark(tiny_lm, bench, storage="shards", resume=True, **kw)
    assert result.answered == 1
    assert Counter(line["id"] for line in manifest_lines(out)) == Counter(
        q.id for q in bench.questions
    )
    assert load_activations(out, sample_id=last["id"])["activations"]["layer_0"].numel() > 0


def test_url_resume_redoes_samples_of_a_missing_shard(tiny_lm):
    import fsspec

    url = "memory://actcap-safety-test/run"
    fs = fsspec.filesystem("memory")
    bench = load_benchmark("demo").limited(4)
    kw = {"capture": CaptureSpec(layers=[0]), "out": url, "progress": False}
    opts = EvalOptions(max_new_tokens=2)
    try:
        run_benchmark(tiny_lm, bench, options=opts, shard_bytes=1, **kw)  # a shard per sample
        entry = open_run(url).entries[0]
        fs.rm(f"/actcap-safety-test/run/{entry.file}")
        with pytest.warns(UserWarning, match="1 finished sample"):
            result = run_benchmark(tiny_lm, bench, options=opts, resume=True, **kw)
        assert result.answered == 1
        info = open_run(url)
        assert sorted(e.id for e in info.entries) == sorted(q.id for q in bench.questions)
        assert load_activations(url, sample_id=entry.id)["prompt"]
    finally:
        if fs.exists("/actcap-safety-test"):
            fs.rm("/actcap-safety-test", recursive=True)


# -- review of issue #11: writes go through the writer's folder descriptors --


def test_a_samples_folder_swapped_for_a_link_mid_run_gets_nothing(tmp_path):
    """The reviewer's race: samples/ renamed away and a link put in its place after sample a."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.safetensors").write_text("precious victim data")
    run = tmp_path / "run"
    with RunWriter.open(run, {"model": "m"}) as w:
        w.write_sample("a", {}, acts(1), SampleMeta("a"))
        os.rename(run / "samples", run / "samples.real")
        (run / "samples").symlink_to(elsewhere, target_is_directory=True)
        w.write_sample("b", {}, acts(2), SampleMeta("b"))
    assert os.listdir(elsewhere) == ["b.safetensors"]
    assert (elsewhere / "b.safetensors").read_text() == "precious victim data"
    assert sorted(os.listdir(run / "samples.real")) == ["a.safetensors", "b.safetensors"]


def test_a_run_folder_moved_mid_run_keeps_every_write(tmp_path):
    run, moved = tmp_path / "run", tmp_path / "moved"
    with RunWriter.open(run, {"model": "m"}) as w:
        w.write_sample("a", {}, acts(1), SampleMeta("a"))
        os.rename(run, moved)
        w.write_sample("b", {}, acts(2), SampleMeta("b"))
        w.write_results({"accuracy": 1.0})
    assert not run.exists()  # no new folder of the same name
    assert sorted(os.listdir(moved / "samples")) == ["a.safetensors", "b.safetensors"]
    assert [line["id"] for line in manifest_lines(moved)] == ["a", "b"]
    assert (moved / "results.json").is_file()


def test_sample_files_written_through_descriptors_read_with_safetensors(tmp_path):
    from safetensors import safe_open

    run = make_run(tmp_path / "run", ["a"])
    with safe_open(str(run / "samples" / "a.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("layer_0"), acts(0.0)["layer_0"])
        assert f.metadata()["format"] == "actcap"
    assert load_activations(run, sample_id="a")["prompt"] == "a"


def test_a_folder_whose_run_json_only_has_format_version_is_no_run(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "samples").mkdir(parents=True)
    (foreign / "run.json").write_text('{"format_version": 1, "tool": "other"}')
    (foreign / "samples" / "keep.safetensors").write_bytes(b"another tool's data")
    (foreign / "manifest.jsonl").write_text("")
    for resume in (False, True):
        with pytest.raises(RunError, match="not an actcap run"):
            RunWriter.open(foreign, {"model": "m"}, resume=resume)
    assert (foreign / "run.json").read_text() == '{"format_version": 1, "tool": "other"}'
    assert (foreign / "samples" / "keep.safetensors").read_bytes() == b"another tool's data"
    assert not (foreign / ".lock").exists()


def test_runs_are_marked_and_older_actcap_runs_still_resume(tmp_path):
    run = make_run(tmp_path / "run", ["a"])
    record = json.loads((run / "run.json").read_text())
    assert record["format"] == "actcap-run"
    del record["format"]  # as written before the mark existed
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match="not an actcap run"):  # no versions.actcap
        RunWriter.open(run, {"model": "m"}, resume=True)
    record["versions"] = {"actcap": "0.1.0"}
    (run / "run.json").write_text(json.dumps(record))
    with RunWriter.open(run, {"model": "m"}, resume=True) as w:
        assert w.is_done("a")


def _fields_bench(tmp_path, question_column):
    data = tmp_path / "q.jsonl"
    rows = [
        {"id": f"q{i}", "q": f"What is {i}+1?", "alt": f"Say {i}", "ans": str(i + 1)}
        for i in range(3)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return load_benchmark(f"jsonl:{data}", {"question": question_column, "answer": "ans"})


def test_resume_refuses_another_field_mapping(tiny_lm, tmp_path):
    out, opts = tmp_path / "run", EvalOptions(max_new_tokens=2, limit=2)
    run_benchmark(
        tiny_lm, _fields_bench(tmp_path, "q"), capture=None, options=opts, out=out, progress=False
    )
    with pytest.raises(RunError, match=r"the question set \(the benchmark file or its --field"):
        run_benchmark(
            tiny_lm,
            _fields_bench(tmp_path, "alt"),
            capture=None,
            options=opts,
            out=out,
            resume=True,
            progress=False,
        )
    opts3 = EvalOptions(max_new_tokens=2, limit=3)  # the same questions, a larger --limit
    result = run_benchmark(
        tiny_lm,
        _fields_bench(tmp_path, "q"),
        capture=None,
        options=opts3,
        out=out,
        resume=True,
        progress=False,
    )
    assert result.answered == 1


def test_resume_compares_the_model_a_relative_name_resolves_to(tiny_lm, tmp_path, monkeypatch):
    import dataclasses

    for folder in ("a", "b"):
        (tmp_path / folder / "tiny").mkdir(parents=True)
    bench, opts, out = (
        load_benchmark("demo"),
        EvalOptions(max_new_tokens=2, limit=1),
        tmp_path / "run",
    )
    relative = dataclasses.replace(tiny_lm, name="tiny", source="tiny")
    monkeypatch.chdir(tmp_path / "a")
    run_benchmark(relative, bench, capture=None, options=opts, out=out, progress=False)
    monkeypatch.chdir(tmp_path / "b")  # "tiny" is now another model
    with pytest.raises(RunError, match=r"--model \(the model it resolves to\) differs"):
        run_benchmark(
            relative, bench, capture=None, options=opts, out=out, resume=True, progress=False
        )
    absolute = str(tmp_path / "a" / "tiny")  # the same folder, given absolutely
    same = dataclasses.replace(tiny_lm, name=absolute, source=absolute)
    opts2 = EvalOptions(max_new_tokens=2, limit=2)
    result = run_benchmark(
        same, bench, capture=None, options=opts2, out=out, resume=True, progress=False
    )
    assert result.answered == 1


@pytest.mark.parametrize("storage", ["files", "shards"])
def test_another_samples_file_in_place_is_damaged(tmp_path, storage):
    run = tmp_path / "run"
    with RunWriter.open(run, {"model": "m"}, storage=storage) as w:  # type: ignore[arg-type]
        for k, i in enumerate(["a", "b"]):
            meta = SampleMeta(prompt=i, extra={"question_id": i})
            w.write_sample(i, {"correct": True}, acts(float(k)), meta)
    if storage == "files":
        (run / "samples" / "a.safetensors").write_bytes(
            (run / "samples" / "b.safetensors").read_bytes()
        )
    else:  # a's line pointing at b's bytes
        lines = manifest_lines(run)
        lines[0].update(offset=lines[1]["offset"], length=lines[1]["length"])
        (run / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(FormatError, match=r"holds sample 'b', not 'a' as the manifest says"):
        load_activations(run, sample_id="a")
    assert load_activations(run, sample_id="b")["prompt"] == "b"
    with (
        pytest.warns(
            UserWarning, match=r"1 finished sample\(s\) missing or damaged.*holds sample 'b'"
        ),
        RunWriter.open(run, {"model": "m"}, resume=True) as w,
    ):
        assert not w.is_done("a") and w.is_done("b")


@pytest.mark.parametrize("name", [".lock", "manifest.jsonl"])
def test_a_hard_linked_run_file_is_never_written(tmp_path, name):
    run = make_run(tmp_path / "run", ["a"])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run / name).unlink()
    os.link(victim, run / name)
    with pytest.raises(RunError, match=rf"{name}: has other hard links"):
        RunWriter.open(run, {"model": "m"}, resume=True)
    assert victim.read_text() == "precious\n"


def test_out_as_a_link_is_refused_before_anything_is_created(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    with pytest.raises(RunError, match=r"link: is a symbolic link"):
        RunWriter.open(tmp_path / "link", {"model": "m"})
    assert list(target.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [({"offset": True}, "not byte counts"), ({"length": 10**6}, "past the shard's end")],
)
def test_a_shard_slice_of_a_bool_offset_or_past_the_end_is_corrupt(tmp_path, change, message):
    run = make_run(tmp_path / "run", ["a", "b"], storage="shards")
    lines = manifest_lines(run)
    lines[1].update(change)
    (run / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(FormatError, match=message):
        load_activations(run, sample_id="b")
