"""Evaluation on a real local Ray cluster: two CPU workers, a tiny model, one run directory."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.distributed import (  # ray is in .[dev]: never skipped
    RayOptions,
    run_benchmark_ray,
)
from actcap.capture import CaptureSpec
from actcap.models import load_model
from actcap.storage import load_activations, open_run
from actcap.storage.run import RunWriter
from tests.conftest import DATA

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"
CAPTURE = CaptureSpec(layers=None)
OPTIONS = EvalOptions(batch_size=4)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The same questions answered in one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    lm = load_model(str(tiny_model_dir), device="cpu")
    bench = load_benchmark(f"mmlu:{MMLU}").limited(24)
    run_benchmark(lm, bench, capture=CAPTURE, options=OPTIONS, out=out, progress=False)
    return out


def assert_equal_runs(ref, got):
    a, b = open_run(ref), open_run(got)
    ra = {e.id: e for e in a.entries}
    rb = {e.id: e for e in b.entries}
    assert sorted(ra) == sorted(rb)
    assert len(b.entries) == len(rb)  # one line per sample
    for qid, ea in ra.items():
        eb = rb[qid]
        for key in ("response", "correct", "extracted", "prompt", "n_prompt_tokens", "grader"):
            assert ea.record[key] == eb.record[key], (qid, key)
        assert ea.record["choice_logprobs"] == pytest.approx(eb.record["choice_logprobs"], abs=1e-4)
        da, db = load_activations(ea.source(a.root)), load_activations(eb.source(b.root))
        assert torch.equal(da["input_ids"], db["input_ids"])
        assert da["activations"].keys() == db["activations"].keys()
        for site, x in da["activations"].items():
            torch.testing.assert_close(x, db["activations"][site], atol=1e-5, rtol=1e-4)
    assert a.results["accuracy"] == b.results["accuracy"]
    assert a.results["per_category"] == b.results["per_category"]


def run_ray(model_dir, out, **kw):
    bench = load_benchmark(f"mmlu:{MMLU}").limited(24)
    return run_benchmark_ray(
        str(model_dir),
        bench,
        out,
        capture=CAPTURE,
        options=kw.pop("options", OPTIONS),
        ray_options=RayOptions(workers=2, load_kwargs={"device": "cpu"}),
        progress=False,
        **kw,
    )


def test_two_workers_equal_one_process(ray_cluster, tiny_model_dir, reference, tmp_path):
    out = tmp_path / "run"
    result = run_ray(tiny_model_dir, out, storage="shards")
    assert result.n == 24 and result.answered == 24
    assert_equal_runs(reference, out)
    # The prompts' shared header is stored once per run by whichever worker met it first.
    assert len(list((out / "prefixes").glob("*.safetensors"))) == 1
    # Two actors at most, one model each (the second may still be starting when a small run ends).
    assert 1 <= len(list((out / "workers").glob("*.json"))) <= 2
    assert not list((out / "manifests").glob("*.jsonl"))  # merged by the driver
    shard_writers = {p.name.split("-")[0] for p in (out / "shards").glob("*.shard")}
    assert shard_writers <= {p.stem for p in (out / "workers").glob("*.json")}
    results = json.loads((out / "results.json").read_text())
    assert results["ray"]["workers"] == 2


def test_resume_across_workers(ray_cluster, tiny_model_dir, reference, tmp_path):
    """Half the run in one process, the rest on two Ray workers: nothing redone, nothing lost."""
    out = tmp_path / "run"
    lm = load_model(str(tiny_model_dir), device="cpu")
    half = load_benchmark(f"mmlu:{MMLU}").limited(24)
    with pytest.raises(KeyboardInterrupt):
        seen = []

        def stop(entry):
            seen.append(entry)
            if len(seen) == 10:
                raise KeyboardInterrupt

        run_benchmark(
            lm, half, capture=CAPTURE, options=OPTIONS, out=out, progress=False, on_sample=stop
        )
    done_before = len(open_run(out).entries)
    result = run_ray(tiny_model_dir, out, resume=True)
    assert result.answered == 24 - done_before
    assert_equal_runs(reference, out)


def test_a_killed_worker_loses_and_duplicates_nothing(
    ray_cluster, tiny_model_dir, reference, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    segments_at_merge = {}
    real_merge = RunWriter.merge_segments

    def snapshot(self, order=None):
        for p in (self.root / "manifests").glob("*.jsonl"):
            segments_at_merge[p.name] = [json.loads(x)["id"] for x in p.read_text().splitlines()]
        return real_merge(self, order)

    monkeypatch.setattr(RunWriter, "merge_segments", snapshot)
    outcome = {}

    options = EvalOptions(batch_size=2, mode="generate", max_new_tokens=12)

    def drive():
        try:
            outcome["result"] = run_ray(tiny_model_dir, out, options=options)
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and driver.is_alive() and time.monotonic() < deadline:
        for seg in (out / "manifests").glob("*.jsonl") if (out / "manifests").exists() else []:
            if seg.read_bytes().count(b"\n") >= 2:
                info = json.loads((out / "workers" / f"{seg.stem}.json").read_text())
                os.kill(info["pid"], signal.SIGKILL)
                killed = info
                break
        time.sleep(0.05)
    driver.join(timeout=300)
    assert killed is not None, "the run ended before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.n == 24
    # Every sample written exactly once over all workers, the killed one included.
    written = [i for ids in segments_at_merge.values() for i in ids]
    assert sorted(written) == sorted(set(written)) and len(written) == 24
    assert len(list((out / "workers").glob("*.json"))) >= 3  # Ray started a replacement actor
    ref = tmp_path / "ref"
    lm = load_model(str(tiny_model_dir), device="cpu")
    bench = load_benchmark(f"mmlu:{MMLU}").limited(24)
    run_benchmark(lm, bench, capture=CAPTURE, options=options, out=ref, progress=False)
    assert_equal_runs(ref, out)


def test_workers_write_through_the_object_store_path(
    ray_cluster, tiny_model_dir, reference, tmp_path
):
    """A ``local://`` URL goes through fsspec like s3:// would (no append, no rename, no lock):
    each worker seals one shard object and one manifest segment per batch."""
    url = f"local://{tmp_path}/run"
    result = run_ray(tiny_model_dir, url)
    assert result.n == 24 and result.out == url
    assert_equal_runs(reference, url)
    info = open_run(url)
    assert info.config["storage"] == "shards"
    assert not (tmp_path / "run" / ".lock").exists()  # not the local POSIX writer
    assert len(list((tmp_path / "run" / "shards").glob("*.shard"))) == 6  # 24 questions / batch 4
    assert not list((tmp_path / "run" / "manifests").iterdir())
