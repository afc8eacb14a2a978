import re
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actcap.analysis import (
    build_report,
    compare_files,
    directory_summary,
    file_stats,
    list_samples,
    load_vectors,
    logit_lens,
    make_figures,
    mean_difference_by_layer,
    plots,
    probe_layers,
    similarity_matrix,
)
from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec
from actcap.cli.main import cli
from actcap.errors import ActcapError
from actcap.storage import (
    ActivationFile,
    SampleMeta,
    load_activations,
    open_run,
    save_activations,
)
from tests.conftest import DATA

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"


@pytest.fixture(scope="module")
def run_dir(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "run"
    bench = load_benchmark(f"mmlu:{MMLU}").limited(24)
    run_benchmark(
        tiny_lm,
        bench,
        capture=CaptureSpec(layers=None),
        options=EvalOptions(batch_size=8),
        out=out,
        progress=False,
    )
    info = open_run(out)
    grades = [e.correct for e in info.entries]
    assert True in grades and False in grades  # the fixture must have both classes
    return out


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_file_stats_match_the_data(run_dir):
    ref = list_samples(run_dir)[0]
    stats = {s.site: s for s in file_stats(ref.path)}
    x = load_activations(ref.path)["activations"]["layer_1"].float()
    s = stats["layer_1"]
    assert s.shape == tuple(x.shape)
    assert s.mean == pytest.approx(float(x.mean()), rel=1e-5)
    assert s.std == pytest.approx(float(x.std(unbiased=False)), rel=1e-4)
    assert s.min == float(x.min()) and s.max == float(x.max())
    assert s.mean_norm == pytest.approx(float(x.norm(dim=-1).mean()), rel=1e-5)
    last = {s.site: s for s in file_stats(ref.path, tokens=slice(-1, None))}["layer_1"]
    assert last.shape == (1, 32)


def test_directory_summary_streams_and_joins_grades(run_dir, tmp_path):
    s = directory_summary(run_dir)
    info = open_run(run_dir)
    assert s.n_files == 24 and len(s.skipped) == 0
    assert s.n_correct == sum(bool(e.correct) for e in info.entries)
    assert [x.site for x in s.sites] == ["embeddings", "layer_0", "layer_1", "layer_2"]
    # aggregated mean equals the mean over all tokens of all files
    all_vals = torch.cat(
        [load_activations(p)["activations"]["layer_0"].flatten() for _, p in info.sample_paths()]
    )
    assert s.sites[1].mean == pytest.approx(float(all_vals.mean()), rel=1e-4)
    assert set(s.by_correct) == {"correct", "incorrect"}


def test_corrupt_and_foreign_files_are_skipped_and_counted(run_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (_, p) in enumerate(list(open_run(run_dir).sample_paths())[:3]):
        # a lone copy: a sample file of the run may lean on the run's shared prefix
        with ActivationFile(p) as f:
            save_activations(folder / f"s{i}.safetensors", dict(f.iter_sites()), f.meta)
    (folder / "text.safetensors").write_text("not activations")
    (folder / "empty.safetensors").write_bytes(b"")
    good = (folder / "s0.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(good[: len(good) // 2])
    s = directory_summary(folder)
    assert s.n_files == 3 and len(s.skipped) == 3
    assert {p.rsplit("/", 1)[-1] for p, _ in s.skipped.files} == {
        "text.safetensors",
        "empty.safetensors",
        "cut.safetensors",
    }
    r = CliRunner().invoke(cli, ["analyze", "--directory", str(folder)])
    assert r.exit_code == 0 and "3 files read, 3 skipped" in r.output


def test_compare_files(run_dir, tmp_path):
    a, b = [p for _, p in list(open_run(run_dir).sample_paths())[:2]]
    rows = {r.site: r for r in compare_files(a, a)}
    assert rows["layer_1"].last_token == pytest.approx(1.0, abs=1e-5)
    assert rows["layer_1"].per_token and all(abs(c - 1) < 1e-5 for c in rows["layer_1"].per_token)
    cross = {r.site: r for r in compare_files(a, b)}
    xa = load_activations(a)["activations"]["layer_1"][-1]
    xb = load_activations(b)["activations"]["layer_1"][-1]
    assert cross["layer_1"].last_token == pytest.approx(
        float(torch.nn.functional.cosine_similarity(xa, xb, dim=0)), abs=1e-5
    )
    assert cross["layer_1"].per_token is None  # different questions, different tokens


def test_similarity_matrix_and_mean_difference(run_dir):
    sim = similarity_matrix(run_dir, "layer_1")
    assert sim.matrix.shape == (24, 24)
    assert np.allclose(np.diag(sim.matrix), 1, atol=1e-5) and np.allclose(
        sim.matrix, sim.matrix.T, atol=1e-6
    )
    vecs = load_vectors(run_dir, ["layer_1"])
    diffs = {d.site: d for d in mean_difference_by_layer(run_dir)}
    good = np.array([s.correct for s in vecs.samples])
    want = np.linalg.norm(
        vecs.vectors["layer_1"][good].mean(0) - vecs.vectors["layer_1"][~good].mean(0)
    )
    assert diffs["layer_1"].norm == pytest.approx(float(want), rel=1e-5)


def test_probes(run_dir):
    results = probe_layers(run_dir, "correct", folds=3)
    assert [r.site for r in results] == ["embeddings", "layer_0", "layer_1", "layer_2"]
    for r in results:
        assert 0 <= r.accuracy <= 1 and r.std >= 0 and r.folds == 3 and r.n == 24
        assert 0.5 <= r.baseline <= 1


def test_probe_on_a_planted_signal(tmp_path):
    """A direction planted in the correct samples' layer_1 must be found there and not in layer_0."""
    rng = np.random.default_rng(0)
    for i in range(40):
        correct = i % 2 == 0
        l1 = rng.normal(size=16) + (6.0 if correct else 0.0) * np.eye(16)[0]
        acts = {
            "layer_0": torch.tensor(rng.normal(size=16), dtype=torch.float32),
            "layer_1": torch.tensor(l1, dtype=torch.float32),
        }
        save_activations(
            tmp_path / f"s{i:02d}.safetensors",
            acts,
            SampleMeta("p", extra={"correct": correct, "category": "x"}),
        )
    res = {r.site: r for r in probe_layers(tmp_path, "correct")}
    assert res["layer_1"].accuracy > 0.9 and res["layer_0"].accuracy < 0.8
    with pytest.raises(ActcapError, match="one class only"):
        probe_layers(tmp_path, "category")


def test_probe_too_few_samples(tmp_path):
    for i in range(3):
        save_activations(
            tmp_path / f"s{i}.safetensors",
            {"layer_0": torch.randn(4)},
            SampleMeta("p", extra={"correct": i == 0}),
        )
    with pytest.raises(ActcapError, match="too few samples"):
        probe_layers(tmp_path)


def test_logit_lens(tiny_lm, run_dir):
    path = list_samples(run_dir)[0].path
    rows = logit_lens(path, tiny_lm, k=3)
    assert [r.site for r in rows] == ["embeddings", "layer_0", "layer_1", "layer_2"]
    # the last layer through the lens equals the model's own next-token distribution
    data = load_activations(path)
    with torch.no_grad():
        logits = tiny_lm.model(data["input_ids"][None]).logits[0, -1]
    top = torch.softmax(logits, -1).topk(3)
    assert rows[-1].probs == pytest.approx(top.values.tolist(), abs=1e-4)
    assert rows[-1].tokens == [tiny_lm.tokenizer.decode([i]) for i in top.indices.tolist()]


def test_pictures(run_dir, tmp_path):
    figs = make_figures(run_dir, tmp_path / "plots")
    names = {f.path.name for f in figs.figures}
    assert names == {
        "histogram.png",
        "token_layer_norms.png",
        "norm_by_layer.png",
        "similarity.png",
        "pca.png",
        "mean_difference.png",
        "probe_accuracy.png",
    }
    sizes = {f.path.name: png_size(f.path) for f in figs.figures}
    assert sizes["histogram.png"] == (800, 500) and sizes["similarity.png"] == (700, 600)
    by_name = {f.path.name: f for f in figs.figures}
    # the numbers drawn come from the data
    first = list_samples(run_dir)[0].path
    acts = load_activations(first)["activations"]
    norms = by_name["token_layer_norms.png"].data["norms"]
    assert np.allclose(norms[1], acts["layer_0"].norm(dim=-1).numpy(), rtol=1e-5)
    hist = by_name["histogram.png"].data
    for site, c in hist["counts"].items():
        assert int(c.sum()) + hist["outside"][site] == acts[site].numel()
    summary = directory_summary(run_dir)
    assert by_name["norm_by_layer.png"].data["values"] == pytest.approx(
        [s.mean_norm for s in summary.sites]
    )


def test_pictures_replace_a_link_at_their_name_never_its_target(run_dir, tmp_path):
    """A symlink at a picture's name is replaced by the picture; the file it led to is untouched."""
    out = tmp_path / "plots"
    out.mkdir()
    names = ["histogram.png", "similarity.png", "pca.png", "norm_by_layer.png"]
    victims = {}
    for name in names:
        victim = tmp_path / f"victim-{name}.txt"
        victim.write_text("keep me")
        (out / name).symlink_to(victim)
        victims[name] = victim
    figs = make_figures(run_dir, out)
    assert {"histogram.png", "similarity.png", "pca.png"} <= {f.path.name for f in figs.figures}
    for name, victim in victims.items():
        assert victim.read_text() == "keep me"
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_pca_scatter_coordinates(tmp_path):
    x = np.random.default_rng(1).normal(size=(10, 6)).astype(np.float32)
    fig = plots.pca_scatter(x, [True] * 5 + [False] * 5, "layer_3", tmp_path / "p.png")
    from sklearn.decomposition import PCA

    ref = PCA(2).fit_transform(x)
    assert np.allclose(np.abs(fig.data["coords"]), np.abs(ref), atol=1e-4)


def test_cli_analysis_commands(run_dir, tmp_path):
    runner = CliRunner()
    first = list_samples(run_dir)[0].path
    r = runner.invoke(cli, ["analyze", "--file", str(first)])
    assert r.exit_code == 0 and "layer_2" in r.output and "norm/tok" in r.output
    r = runner.invoke(cli, ["analyze", "--directory", str(run_dir)])
    assert r.exit_code == 0 and "accuracy" in r.output and "24 files read, 0 skipped" in r.output
    second = list_samples(run_dir)[1].path
    r = runner.invoke(cli, ["analyze", "--compare", str(first), str(second)])
    assert r.exit_code == 0 and "tokens differ" in r.output
    r = runner.invoke(cli, ["plot", str(run_dir), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0 and (tmp_path / "p" / "pca.png").exists()
    r = runner.invoke(cli, ["probe", str(run_dir), "--folds", "3"])
    assert r.exit_code == 0 and "majority baseline" in r.output
    r = runner.invoke(cli, ["probe", str(run_dir), "--target", "category"])
    assert r.exit_code == 1 and "one class only" in r.output
    r = runner.invoke(cli, ["analyze"])
    assert r.exit_code != 0 and "exactly one" in r.output


def test_analyze_activations_script(run_dir):
    import subprocess
    import sys

    from tests.conftest import REPO

    first = list_samples(run_dir)[0].path
    r = subprocess.run(
        [sys.executable, str(REPO / "analyze_activations.py"), "--file", str(first)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "layer_1" in r.stdout
    r = subprocess.run(
        [sys.executable, str(REPO / "analyze_activations.py"), "--directory", str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "accuracy" in r.stdout


def test_report_is_self_contained(run_dir, tmp_path):
    out = build_report(run_dir, tmp_path / "r.html")
    text = out.read_text()
    assert "<img" in text and "data:image/png;base64," in text and "src='http" not in text
    assert "id='samples'" in text and "id='accuracy'" in text


@pytest.mark.slow
def test_default_model_end_to_end_analysis(default_lm, tmp_path):
    """actcap eval on the real model, then every analysis over its run."""
    out = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(
        cli,
        [
            "eval",
            "--model",
            "default",
            "--benchmark",
            "demo",
            "--limit",
            "12",
            "--layers",
            "0,10,20,-1",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    s = directory_summary(out)
    assert s.n_files == 12 and [x.site for x in s.sites] == [
        "layer_0",
        "layer_10",
        "layer_20",
        "layer_29",
    ]
    figs = make_figures(out, tmp_path / "plots")
    assert len(figs.figures) >= 5 and all(png_size(f.path)[0] > 0 for f in figs.figures)
    page = build_report(out, tmp_path / "report.html").read_text()
    assert "SmolLM2-135M-Instruct" in page and page.count("<img") == len(figs.figures)
    rows = logit_lens(list_samples(out)[0].path, default_lm, k=3)
    assert [x.site for x in rows] == ["layer_0", "layer_10", "layer_20", "layer_29"]


# --- issue 11, item 14: runs without activations, one-question classes, help texts ------------


def no_capture_run(root):
    from actcap.storage import RunWriter

    with RunWriter.open(root, {"model": "m", "benchmark": "b"}) as run:
        for i in range(4):
            run.write_sample(f"q{i}", {"question": f"q {i}", "correct": i % 2 == 0})
        run.write_results({"accuracy": 0.5, "n": 4, "n_correct": 2})
    return root


def test_a_run_without_activations_says_so(tmp_path):
    from actcap.errors import NoActivationsError

    run = no_capture_run(tmp_path / "run")
    with pytest.raises(NoActivationsError, match="no activations.*--no-capture"):
        list_samples(run)
    with pytest.raises(NoActivationsError):
        directory_summary(run)
    runner = CliRunner()
    for args in (
        ["analyze", "--directory", str(run)],
        ["plot", str(run), "--out", str(tmp_path / "p")],
        ["probe", str(run)],
    ):
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output)
        assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1
        assert "has no activations" in r.output and "--no-capture" in r.output
    # the report still shows the accuracy and the questions, without pictures
    r = runner.invoke(cli, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "No pictures" in page and "has no activations" in page and "q 3" in page
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(cli, ["plot", str(empty)])
    assert r.exit_code == 1 and "no activation files" in r.output


def test_probe_leaves_out_classes_of_one_sample(tmp_path):
    rng = np.random.default_rng(0)
    categories = ["a"] * 8 + ["b"] * 8 + ["lonely"] + ["alone"]
    for i, cat in enumerate(categories):
        save_activations(
            tmp_path / f"s{i:02d}.safetensors",
            {"layer_0": torch.tensor(rng.normal(size=8), dtype=torch.float32)},
            SampleMeta("p", extra={"category": cat}),
        )
    results = probe_layers(tmp_path, "category", folds=3)
    assert results[0].n == 16 and results[0].left_out == (("alone", 1), ("lonely", 1))
    r = CliRunner().invoke(cli, ["probe", str(tmp_path), "--target", "category", "--folds", "3"])
    assert r.exit_code == 0, r.output
    assert "left out 2 class(es) with a single sample: 'alone' (1), 'lonely' (1)" in r.output


def test_analysis_options_have_help():
    runner = CliRunner()
    for command, options in (
        ("report", ["--site", "--target", "--out"]),
        ("plot", ["--site", "--target", "--out"]),
        ("probe", ["--target", "--folds", "--reduce", "--max-samples"]),
    ):
        text = runner.invoke(cli, [command, "--help"]).output
        for option in options:
            line = next(x for x in text.splitlines() if re.match(rf"\s+(-\w, )?{option}\b", x))
            described = re.split(r"\s{2,}", line.strip())[1:]  # not only "[default: ...]"
            assert described and not described[0].startswith("["), f"{command}: {line!r}"


def test_log_scale_tick_labels_are_numbers_not_mathtext_code(run_dir, tmp_path, monkeypatch):
    """Titles are drawn as plain text (a ``$`` in a site name must not be parsed), so log axes
    need plain tick labels: matplotlib's default ones are mathtext and showed as raw code."""
    import matplotlib.text

    from actcap.analysis import plots

    drawn: list[str] = []
    real_save = plots._save

    def save(fig, *args, **kwargs):
        result = real_save(fig, *args, **kwargs)
        drawn.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return result

    monkeypatch.setattr(plots, "_save", save)
    first = list_samples(run_dir)[0].path
    plots.token_layer_norms(first, tmp_path / "norms.png")
    plots.histogram(first, tmp_path / "hist.png")
    assert drawn and not [t for t in drawn if "$" in t or "mathdefault" in t], drawn
