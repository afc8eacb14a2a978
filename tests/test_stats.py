"""Running statistics over every token (``--stats``): exact against numpy, mergeable, stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actcap.capture.stats import N_NORM_BINS, NORM_EDGES, SiteStats


def _padded_batches(seed: int = 0, hidden: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded random batches with different row lengths; padding holds huge junk values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch, seq in [(3, 7), (2, 5), (4, 9)]:
        x = torch.randn(batch, seq, hidden, generator=g) * 3 + 1
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        mask = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]
        x[~mask] = 1e6  # padding must never count
        out.append((x, mask))
    return out


def _feed(stats: SiteStats, batches: list[tuple[torch.Tensor, torch.Tensor]], first: int) -> int:
    sample = first
    for x, mask in batches:
        ids = torch.arange(sample, sample + x.shape[0])
        stats.update(x, mask, ids)
        sample += x.shape[0]
    return sample


def _rows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    return np.concatenate([x[m].double().numpy() for x, m in batches])


def test_stats_exact_against_numpy_with_padding() -> None:
    batches = _padded_batches()
    stats = SiteStats(12, k=5)
    _feed(stats, batches, 0)
    rows = _rows(batches)
    assert int(stats.count) == len(rows)
    np.testing.assert_allclose(stats.mean.numpy(), rows.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.variance.numpy(), rows.var(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.max_abs.numpy(), np.abs(rows).max(0))
    norms = np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(float(stats.norm_sum), norms.sum(), rtol=1e-12)
    expected_hist = np.bincount(
        np.searchsorted(np.array(NORM_EDGES), norms, side="right"), minlength=N_NORM_BINS
    )
    assert stats.norm_hist.tolist() == expected_hist.tolist()


def test_top_k_values_and_their_places() -> None:
    batches = _padded_batches(seed=3)
    stats = SiteStats(12, k=4)
    _feed(stats, batches, 100)
    top = stats.finished()
    # Every (sample, position, dim, value) of the real tokens, largest magnitude first.
    places = []
    sample = 100
    for x, mask in batches:
        for b in range(x.shape[0]):
            real = x[b][mask[b]]
            for pos in range(real.shape[0]):
                for d in range(real.shape[1]):
                    places.append(
                        (abs(float(real[pos, d])), sample + b, pos, d, float(real[pos, d]))
                    )
        sample += x.shape[0]
    places.sort(reverse=True)
    assert top.top_sample.tolist() == [p[1] for p in places[:4]]
    assert top.top_position.tolist() == [p[2] for p in places[:4]]
    assert top.top_dim.tolist() == [p[3] for p in places[:4]]
    np.testing.assert_allclose(top.top_value.numpy(), [p[4] for p in places[:4]])


def test_merge_equals_one_pass() -> None:
    batches = _padded_batches(seed=1) + _padded_batches(seed=2)
    whole = SiteStats(12)
    _feed(whole, batches, 0)
    first, second = SiteStats(12), SiteStats(12)
    n = _feed(first, batches[:2], 0)
    _feed(second, batches[2:], n)
    merged = first.merge(SiteStats.from_tensors(second.to_tensors()))
    for name, value in whole.finished().to_tensors().items():
        got = merged.finished().to_tensors()[name]
        np.testing.assert_allclose(got.numpy(), value.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


def test_fewer_tokens_than_k_and_an_empty_batch() -> None:
    stats = SiteStats(3, k=16)
    x = torch.tensor([[[1.0, -5.0, 2.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[True, False]])
    stats.update(x, mask, torch.tensor([7]))
    stats.update(x, torch.zeros_like(mask), torch.tensor([8]))
    top = stats.finished()
    assert int(top.count) == 1
    assert top.top_value.tolist() == [-5.0, 2.0, 1.0]
    assert top.top_sample.tolist() == [7, 7, 7]
    np.testing.assert_allclose(top.variance.numpy(), [0, 0, 0])


def _numpy_stats(rows: list[torch.Tensor]) -> dict[str, np.ndarray]:
    data = np.concatenate([r.double().numpy() for r in rows])
    return {
        "count": np.array(len(data)),
        "mean": data.mean(0),
        "variance": data.var(0),
        "max_abs": np.abs(data).max(0),
        "norm_sum": np.linalg.norm(data, axis=1).sum(),
    }


def _assert_matches(stats: SiteStats, expected: dict[str, np.ndarray]) -> None:
    assert int(stats.count) == int(expected["count"])
    got = {
        "mean": stats.mean,
        "variance": stats.variance,
        "max_abs": stats.max_abs,
        "norm_sum": stats.norm_sum,
    }
    for name, value in got.items():
        np.testing.assert_allclose(
            value.numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name
        )


SITES = ["embeddings", 0, -1]


@pytest.mark.parametrize("generate", [False, True])
def test_capture_stats_cover_every_token_under_last(tiny_lm, generate: bool) -> None:
    from actcap.capture import resolve_sites
    from actcap.capture.collect import GenerationOptions, run_prompts
    from actcap.capture.spec import CaptureSpec
    from actcap.capture.stats import StatsCollector

    prompts = ["The cat sat on the mat", "Hi", "A much longer prompt with many more words in it"]
    gen = GenerationOptions(max_new_tokens=5, min_new_tokens=2) if generate else None
    full = CaptureSpec(layers=SITES, token_selection="all", capture_generated=generate)
    sites = resolve_sites(tiny_lm.model, tiny_lm.layout, full.layers)
    stored = run_prompts(tiny_lm, prompts, full, generation=gen, batch_size=3, sites=sites)
    collector = StatsCollector([s.name for s in sites], k=4)
    last = CaptureSpec(layers=SITES, token_selection="last", capture_generated=generate)
    kept = run_prompts(
        tiny_lm, prompts, last, generation=gen, batch_size=2, sites=sites, stats=collector
    )
    assert kept[0].activations["layer_0"].dim() == 1  # still only the last token stored
    for name, stats in collector.finished().items():
        rows = [s.activations[name] for s in stored]
        _assert_matches(stats, _numpy_stats(rows))
        # The largest activation is where the full run has it.
        sample, pos, dim = (
            int(stats.top_sample[0]),
            int(stats.top_position[0]),
            int(stats.top_dim[0]),
        )
        assert float(rows[sample][pos, dim]) == pytest.approx(float(stats.top_value[0]), rel=1e-5)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_loglik_stats_count_a_shared_prefix_once_per_prompt(tiny_lm, prefix_cache: bool) -> None:
    from actcap.bench import load_benchmark
    from actcap.bench.prompts import build_prompt
    from actcap.bench.scoring import answer_loglik
    from actcap.capture import resolve_sites
    from actcap.capture.spec import CaptureSpec
    from actcap.capture.stats import StatsCollector
    from tests.conftest import DATA

    bench = load_benchmark(
        f"mmlu:{DATA / 'mmlu' / 'test' / 'high_school_geography_test.csv'}"
    ).limited(5)
    qs = bench.questions
    prompts = [build_prompt(tiny_lm.tokenizer, q, bench.shots_for(q, 3), "loglik") for q in qs]
    full = CaptureSpec(layers=SITES, token_selection="all")
    sites = resolve_sites(tiny_lm.model, tiny_lm.layout, full.layers)
    stored = answer_loglik(tiny_lm, qs, prompts, full, sites, 5, prefix_cache=False)
    collector = StatsCollector([s.name for s in sites])
    last = CaptureSpec(layers=SITES, token_selection="last")
    answer_loglik(tiny_lm, qs, prompts, last, sites, 5, prefix_cache=prefix_cache, stats=collector)
    for name, stats in collector.finished().items():
        _assert_matches(stats, _numpy_stats([a.activations[name] for a in stored]))


def _eval(tiny_model_dir, out, mode: str, *flags: str) -> None:
    from click.testing import CliRunner

    from actcap.cli.main import cli
    from tests.conftest import DATA

    bench = DATA / "mmlu" / "test" / "high_school_geography_test.csv"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", f"mmlu:{bench}"]
    args += ["--limit", "5", "--batch-size", "3", "--few-shot", "2", "--mode", mode]
    args += ["--layers", "embeddings,0,-1", "--max-new-tokens", "4", "--verify", "0"]
    r = CliRunner().invoke(cli, [*args, "--out", str(out), "--quiet", *flags])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_eval_stats_equal_numpy_over_a_run_storing_every_token(tiny_model_dir, tmp_path, mode):
    from click.testing import CliRunner

    from actcap.cli.main import cli
    from actcap.storage import load_activations, open_run
    from actcap.storage.stats_file import read_stats

    gen = ["--capture-generated"] if mode == "generate" else []
    _eval(tiny_model_dir, tmp_path / "all", mode, "--token-selection", "all", *gen)
    _eval(
        tiny_model_dir, tmp_path / "last", mode, "--token-selection", "last", "--stats", "all", *gen
    )
    full = {
        e.id: load_activations(src)["activations"]
        for e, src in open_run(tmp_path / "all").sample_paths()
    }
    contents = read_stats(tmp_path / "last")
    assert contents is not None and contents.n_samples == 5
    assert sorted(contents.sites) == sorted(next(iter(full.values())))
    assert "layer_0" in contents.sites
    for site, tensors in contents.sites.items():
        stats = SiteStats.from_tensors(tensors)
        _assert_matches(stats, _numpy_stats([acts[site] for acts in full.values()]))
        top = full[contents.samples[int(stats.top_sample[0])]][site]
        value = top[int(stats.top_position[0]), int(stats.top_dim[0])]
        assert float(value) == pytest.approx(float(stats.top_value[0]), rel=1e-5)
    # Only the last token stored, and the statistics shown by analyze and the report.
    last = open_run(tmp_path / "last")
    entry, src = next(iter(last.sample_paths()))
    assert load_activations(src)["activations"]["layer_0"].dim() == 1
    r = CliRunner().invoke(cli, ["analyze", "--directory", str(tmp_path / "last")])
    assert r.exit_code == 0, r.output
    assert "statistics over every token" in r.output and "layer_0:" in r.output
    report = tmp_path / "report.html"
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "last"), "--out", str(report)])
    assert r.exit_code == 0, r.output
    assert "Statistics over every token" in report.read_text()


def test_stats_of_an_uncaptured_site_is_one_line(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from actcap.cli.main import cli
    from tests.conftest import DATA

    bench = DATA / "mmlu" / "test" / "high_school_geography_test.csv"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", f"mmlu:{bench}", "--limit", "2"]
    r = CliRunner().invoke(
        cli, [*args, "--layers", "0", "--stats", "1", "--out", str(tmp_path / "r")]
    )
    assert r.exit_code != 0 and "layer_1 is not captured" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(
        cli, [*args, "--no-capture", "--stats", "all", "--out", str(tmp_path / "s")]
    )
    assert r.exit_code != 0 and "--stats needs capture" in r.output


def _expected_from_run(root) -> dict[str, dict[str, np.ndarray]]:
    from actcap.storage import load_activations, open_run

    acts = [load_activations(src)["activations"] for _, src in open_run(root).sample_paths()]
    return {site: _numpy_stats([a[site] for a in acts]) for site in acts[0]}


def _stats_of_run(root) -> tuple[dict[str, SiteStats], int]:
    from actcap.storage.stats_file import read_stats

    contents = read_stats(root)
    assert contents is not None
    return {s: SiteStats.from_tensors(t) for s, t in contents.sites.items()}, contents.n_samples


def test_resumed_run_stats_count_every_sample_once_in_shards(tiny_lm, tmp_path) -> None:
    from actcap.bench import EvalOptions, load_benchmark, run_benchmark
    from actcap.capture.spec import CaptureSpec
    from tests.conftest import DATA

    bench = load_benchmark(f"mmlu:{DATA / 'mmlu' / 'test' / 'high_school_geography_test.csv'}")
    every = CaptureSpec(layers=[0, -1], token_selection="all")
    last = CaptureSpec(layers=[0, -1], token_selection="last", stats=("all",))
    run_benchmark(
        tiny_lm,
        bench,
        capture=every,
        options=EvalOptions(batch_size=3, few_shot=1, limit=6),
        out=tmp_path / "all",
        progress=False,
        verify=0,
    )
    for limit, resume in ((4, False), (6, True)):
        run_benchmark(
            tiny_lm,
            bench,
            capture=last,
            options=EvalOptions(batch_size=3, few_shot=1, limit=limit),
            out=tmp_path / "last",
            resume=resume,
            progress=False,
            storage="shards",
            verify=0,
        )
    stats, n = _stats_of_run(tmp_path / "last")
    assert n == 6
    for site, expected in _expected_from_run(tmp_path / "all").items():
        _assert_matches(stats[site], expected)


def test_ray_workers_stats_and_float8_equal_one_process(tiny_model_dir, tmp_path) -> None:
    import os

    import ray

    from actcap.bench import EvalOptions, load_benchmark, run_benchmark
    from actcap.bench.distributed import RayOptions, run_benchmark_ray
    from actcap.capture.spec import CaptureSpec
    from actcap.models import load_model
    from actcap.storage import load_activations, open_run
    from tests.conftest import DATA

    bench = load_benchmark(f"mmlu:{DATA / 'mmlu' / 'test' / 'high_school_geography_test.csv'}")
    options = EvalOptions(batch_size=2, few_shot=1, limit=6)
    lm = load_model(str(tiny_model_dir), device="cpu")
    every = CaptureSpec(layers=[0, -1], token_selection="all")
    run_benchmark(
        lm, bench, capture=every, options=options, out=tmp_path / "one", progress=False, verify=0
    )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        run_benchmark_ray(
            str(tiny_model_dir),
            bench,
            tmp_path / "ray",
            capture=CaptureSpec(
                layers=[0, -1], token_selection="all", dtype="float8", stats=("all",)
            ),
            options=options,
            ray_options=RayOptions(workers=2, load_kwargs={"device": "cpu"}),
            progress=False,
        )
    finally:
        ray.shutdown()
    stats, n = _stats_of_run(tmp_path / "ray")
    assert n == 6
    for site, expected in _expected_from_run(tmp_path / "one").items():
        _assert_matches(stats[site], expected)
    one = {
        e.id: load_activations(s)["activations"]
        for e, s in open_run(tmp_path / "one").sample_paths()
    }
    for e, src in open_run(tmp_path / "ray").sample_paths():
        for site, got in load_activations(src)["activations"].items():
            full = one[e.id][site]
            torch.testing.assert_close(got, full, rtol=2**-4, atol=float(full.abs().max()) * 2**-9)


def test_stats_with_an_lm_eval_task_is_refused(tiny_model_dir) -> None:
    from click.testing import CliRunner

    from actcap.cli.main import cli

    args = ["eval", "--model", str(tiny_model_dir), "--task", "arc_easy", "--stats", "all"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "--stats cannot go with --task" in r.output


def _stats_run(tiny_lm, out, resume: bool = False, limit: int = 4) -> None:
    from actcap.bench import EvalOptions, load_benchmark, run_benchmark
    from actcap.capture.spec import CaptureSpec
    from tests.conftest import DATA

    bench = load_benchmark(f"mmlu:{DATA / 'mmlu' / 'test' / 'high_school_geography_test.csv'}")
    run_benchmark(
        tiny_lm,
        bench,
        capture=CaptureSpec(layers=[0, -1], token_selection="all", stats=("all",)),
        options=EvalOptions(batch_size=2, few_shot=3, limit=limit),
        out=out,
        resume=resume,
        progress=False,
        storage="files",
        verify=0,
    )


@pytest.mark.parametrize("damage", ["sample", "prefixes"])
def test_resume_answering_samples_again_restarts_the_stats(tiny_lm, tmp_path, damage) -> None:
    import shutil
    import warnings

    from actcap.storage.stats_file import read_stats

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole first session warns about nothing
        _stats_run(tiny_lm, out)
    first = read_stats(out)
    assert first is not None and first.n_samples == 4 and first.counted is not None
    assert sorted(first.counted) == sorted(set(first.counted))
    if damage == "sample":
        victim = sorted((out / "samples").glob("*.safetensors"))[0]
        victim.unlink()
    else:
        assert (out / "prefixes").is_dir()
        shutil.rmtree(out / "prefixes")
    with pytest.warns(UserWarning, match="answered again") as caught:
        _stats_run(tiny_lm, out, resume=True)
    stats_warnings = [w for w in caught if "statistics" in str(w.message)]
    assert len(stats_warnings) == 1, [str(w.message) for w in caught]
    again = read_stats(out)
    assert again is not None and again.counted is not None
    assert again.n_samples == len(again.counted) <= 4
    assert len(set(again.counted)) == again.n_samples
    message = str(stats_warnings[0].message)
    assert f"cover {again.n_samples} of the run's 4 samples" in message
    if damage == "sample":
        assert again.n_samples == 1 and "1 sample counted" in message
    if again.n_samples == 4:  # every sample answered again: the same statistics as the first
        for site, tensors in first.sites.items():
            assert torch.equal(tensors["count"], again.sites[site]["count"])


def test_capture_spec_stats_must_be_strings() -> None:
    from actcap.capture.spec import CaptureSpec
    from actcap.errors import ActcapError

    assert CaptureSpec(stats="all").stats == ("all",)
    assert CaptureSpec(stats=["0", "layer_1"]).stats == ("0", "layer_1")
    for bad in (True, 3, [0], None):
        with pytest.raises(ActcapError, match="'all'"):
            CaptureSpec(stats=bad)  # type: ignore[arg-type]


def _rewrite_stats(path, change) -> None:
    """Apply ``change(tensors, metadata)`` to a statistics file (both dicts, edited in place)."""
    import json

    from safetensors.torch import load, save

    data = path.read_bytes()
    tensors = dict(load(data))
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    change(tensors, metadata)
    path.write_bytes(save(tensors, metadata=metadata))


def _set(key: str, value):
    return lambda t, m: t.__setitem__(key, value)


def _wider(t, m) -> None:
    for name in ("mean", "m2", "max_abs"):
        t[f"layer_0/{name}"] = torch.cat([t[f"layer_0/{name}"], torch.ones(1, dtype=torch.float64)])


CORRUPTIONS = {
    "missing tensor": lambda t, m: t.pop("layer_0/mean"),
    "top_sample out of range": _set("layer_0/top_sample", torch.full((16,), 99)),
    "top_dim out of range": _set("layer_0/top_dim", torch.full((16,), 10**6)),
    "top lists of unequal length": _set("layer_0/top_dim", torch.zeros(3, dtype=torch.int64)),
    "sites not a list": lambda t, m: m.__setitem__("sites", '"layer_0"'),
    "samples not a list": lambda t, m: m.__setitem__("samples", "5"),
    "samples of numbers": lambda t, m: m.__setitem__("samples", "[1, 2]"),
    "n_samples not a number": lambda t, m: m.__setitem__("n_samples", "many"),
    "site without tensors": lambda t, m: m.__setitem__(
        "sites", json.dumps([*json.loads(m["sites"]), "layer_9"])
    ),
    "tensor of no site": _set("ghost/count", torch.ones(1, dtype=torch.int64)),
    "count of shape [0]": _set("layer_0/count", torch.zeros(0, dtype=torch.int64)),
    "count of floats": _set("layer_0/count", torch.ones(1)),
    "m2 of another width": _set("layer_0/m2", torch.zeros(3, dtype=torch.float64)),
    "norm_hist of the wrong size": _set("layer_0/norm_hist", torch.zeros(7, dtype=torch.int64)),
}


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory, tiny_lm):
    out = tmp_path_factory.mktemp("stats") / "run"
    _stats_run(tiny_lm, out, limit=3)
    return out


def _damaged_copy(stats_run, tmp_path, change):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stats_run, run)
    if change is None:
        (run / "stats.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    else:
        _rewrite_stats(run / "stats.safetensors", change)
    return run


@pytest.mark.parametrize("what", [*CORRUPTIONS, "not safetensors"])
def test_a_damaged_stats_file_is_one_line_in_analyze_and_report(stats_run, tmp_path, what):
    from click.testing import CliRunner

    from actcap.cli.main import cli

    run = _damaged_copy(stats_run, tmp_path, CORRUPTIONS.get(what))
    for args in (
        ["analyze", "--directory", str(run)],
        ["report", str(run), "--out", str(tmp_path / "r.html")],
    ):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (args, r.output)
        assert "Traceback" not in r.output and r.exception is not None
        errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "stats.safetensors" in errors[0], r.output
        assert "--resume" not in errors[0]


@pytest.mark.parametrize("what", ["not safetensors", "top_sample out of range", "wider"])
def test_resume_over_a_damaged_or_unfitting_stats_file_restarts_them(
    stats_run, tmp_path, tiny_lm, what
):
    from actcap.storage.stats_file import read_stats

    change = _wider if what == "wider" else CORRUPTIONS.get(what)
    run = _damaged_copy(stats_run, tmp_path, change)
    if what == "wider":
        assert read_stats(run) is not None  # a sound file, of another width than the run's
    with pytest.warns(UserWarning, match="restart with this session and cover 1 of the run's 4"):
        _stats_run(tiny_lm, run, resume=True, limit=4)
    contents = read_stats(run)
    assert contents is not None and contents.n_samples == 1
    assert int(contents.sites["layer_0"]["mean"].shape[0]) == int(
        read_stats(stats_run).sites["layer_0"]["mean"].shape[0]  # type: ignore[union-attr]
    )
