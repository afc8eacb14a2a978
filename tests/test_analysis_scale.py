"""Analysis of a run of 100,000 samples in bounded memory (issue 11, item 15).

The run is synthetic: written straight with the storage writer (shards, 3 layers plus the
embeddings, hidden size 8, last token), which takes about 10 s, where answering 100,000
questions with a model would take minutes. Memory is measured in a subprocess (its peak resident
size) against a run of 1,000 samples: the difference is what the run's size costs.

``python -m tests.test_analysis_scale [SAMPLES]`` prints the time and peak memory of every
analysis command on such a run (the figures in ``docs/performance.md``).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from actcap.analysis import (
    directory_summary,
    load_vectors,
    make_figures,
    plots,
    probe_layers,
    similarity_matrix,
)
from actcap.analysis.vectors import MAX_COSINE_ROWS, cosine_matrix, spread
from actcap.errors import ActcapError
from actcap.storage import RunWriter, SampleMeta

SITES = ("embeddings", "layer_0", "layer_1", "layer_2")
HIDDEN = 8
BIG = 100_000

PEAK = """
import re, resource, sys, time
from pathlib import Path
from actcap.cli.main import cli
start = time.perf_counter()
try:
    cli(sys.argv[1:], prog_name="actcap")
except SystemExit as e:
    if e.code:
        raise
status = Path("/proc/self/status")
found = re.search(r"VmHWM:\\s+(\\d+) kB", status.read_text()) if status.exists() else None
kb = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"PEAK {kb // 1024} MB TIME {time.perf_counter() - start:.1f} s")
"""
"""Run one actcap command; print its peak resident memory and its time.

The peak is the process's own high-water mark (``VmHWM``): ``ru_maxrss`` would also count the
parent's memory at the fork (a pytest process of 1 GB makes every child look 1 GB).
"""


def synthetic_run(root: Path, n: int, seed: int = 0) -> Path:
    """A sharded run of ``n`` samples, last token only: a third correct, five categories."""
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(rng.normal(size=(n, len(SITES), HIDDEN)).astype(np.float32))
    meta = SampleMeta("synthetic prompt", model="synthetic", token_selection="last")
    config = {
        "model": "synthetic",
        "benchmark": "synthetic",
        "capture": {"sites": list(SITES), "token_selection": "last"},
        "storage": "shards",
    }
    with mock.patch("os.fsync"), RunWriter.open(root, config, storage="shards") as run:
        for i in range(n):
            record = {
                "question": f"question {i}",
                "response": "A",
                "reference": "A" if i % 3 == 0 else "B",
                "correct": i % 3 == 0,
                "category": f"c{i % 5}",
            }
            acts = {s: data[i, j] for j, s in enumerate(SITES)}
            run.write_sample(f"q{i:06d}", record, acts, meta)
        run.write_results({"accuracy": 0.333, "n": n, "n_correct": (n + 2) // 3})
    return root


def measure(*args: str) -> tuple[int, float, str]:
    """Peak resident memory (MB) and time (s) of one actcap command, run in a subprocess."""
    r = subprocess.run(
        [sys.executable, "-c", PEAK, *args], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    words = r.stdout.split()
    return int(words[-5]), float(words[-2]), r.stdout


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("scale") / "run", BIG)


def test_report_of_100k_samples_in_bounded_memory(big_run, tmp_path):
    """The report (every picture, the probes, the table) of 100,000 samples in a few hundred MB.

    Before: a 100,000 x 100,000 similarity matrix (40 GB) was made, and the kernel killed the
    report of 20,000 samples at 24 GB.
    """
    small = synthetic_run(tmp_path / "small", 1_000)
    base, _, _ = measure("report", str(small), "-o", str(tmp_path / "small.html"))
    peak, seconds, _ = measure("report", str(big_run), "-o", str(tmp_path / "big.html"))
    full_matrix_mb = BIG * BIG * 4 // 2**20
    print(f"report peak RSS: {base} MB at 1,000 samples, {peak} MB at {BIG:,} ({seconds:.0f} s)")
    # measured: 520 -> 670 MB; the growth is the manifest's 100,000 records (Python objects)
    assert peak - base < 400, (base, peak)
    assert peak < full_matrix_mb / 50
    page = (tmp_path / "big.html").read_text()
    assert "(500 of 100,000 samples)" in page  # the similarity heatmap says it is a subsample
    assert "(5,000 of 100,000 samples)" in page  # the PCA scatter
    assert "trained and tested on 20,000 of 100,000 labelled samples" in page
    assert "the first 2,000 of 100,000 samples listed" in page
    assert page.count("<tr data-correct=") == 2_000


def test_vectors_spill_to_disk_beyond_the_budget(tmp_path):
    run = synthetic_run(tmp_path / "run", 300)
    held = load_vectors(run)
    spilled = load_vectors(run, budget=0)
    assert not isinstance(spilled.vectors, dict) and isinstance(held.vectors, dict)
    assert spilled.sites == held.sites == list(SITES)
    for s in SITES:
        assert np.array_equal(spilled.vectors[s], held.vectors[s])
    assert spilled.mean_norms == pytest.approx(held.mean_norms)
    summary = {s.site: s.mean_norm for s in directory_summary(run).sites}
    assert held.mean_norms == pytest.approx(summary)
    folder = spilled.vectors.folder  # type: ignore[attr-defined]
    assert folder.is_dir()
    del spilled
    gc.collect()
    assert not folder.exists()  # the temporary files go with the vectors
    # probes read one site at a time from the spilled files and find the same as in memory
    a = probe_layers(run, folds=3, vectors=held)
    b = probe_layers(run, folds=3, vectors=load_vectors(run, budget=0))
    assert [(r.site, r.accuracy) for r in a] == [(r.site, r.accuracy) for r in b]


def test_pictures_of_many_samples_show_a_stated_subsample(tmp_path):
    run = synthetic_run(tmp_path / "run", 1_200)
    vecs = load_vectors(run)
    sim = similarity_matrix(run, "layer_1", vectors=vecs, max_samples=100)
    assert len(sim.ids) == 100 and sim.matrix.shape == (100, 100) and sim.total == 1_200
    assert sim.ids == [vecs.samples[i].id for i in spread(1_200, 100)]  # deterministic
    fig = plots.similarity_heatmap(sim, tmp_path / "sim.png")
    assert fig.title.endswith("(100 of 1,200 samples)")
    x = vecs.vectors["layer_1"]
    pca = plots.pca_scatter(
        x, [s.correct for s in vecs.samples], "layer_1", tmp_path / "p.png", 300
    )
    assert pca.title.endswith("(300 of 1,200 samples)") and pca.data["coords"].shape == (300, 2)
    centred = x.astype(np.float64) - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    assert pca.data["explained"] == pytest.approx((s[:2] ** 2) / (s**2).sum(), rel=1e-3)
    rows = pca.data["rows"]
    assert np.allclose(np.abs(pca.data["coords"]), np.abs(centred[rows] @ vt[:2].T), atol=1e-3)
    figs = make_figures(run, tmp_path / "plots")
    titles = " ".join(f.title for f in figs.figures)
    assert "(500 of 1,200 samples)" in titles


def test_probes_take_a_stratified_subsample(tmp_path):
    run = synthetic_run(tmp_path / "run", 900)
    results = probe_layers(run, "category", folds=3, max_samples=100)
    assert all(r.n == 100 and r.labelled == 900 for r in results)
    every = probe_layers(run, "correct", sites=["layer_0"], folds=3, max_samples=None)
    assert every[0].n == 900 and every[0].labelled == 900


def test_a_similarity_matrix_too_large_is_refused():
    with pytest.raises(ActcapError, match="pass at most"):
        cosine_matrix(np.zeros((MAX_COSINE_ROWS + 1, 1), dtype=np.float32))


def test_spread():
    rows = spread(BIG, 500)
    assert len(rows) == 500 and rows[0] == 0 and rows[-1] == BIG - 1
    assert rows == sorted(set(rows)) and spread(10, 500) == list(range(10))
    assert spread(5, 1) == [0] and spread(5, 0) == []


def main(n: int) -> None:
    """Print the time and peak memory of each analysis command on a synthetic run of ``n`` samples."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = synthetic_run(Path(tmp) / "run", n)
        size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
        print(
            f"synthetic run: {n:,} samples, {len(SITES)} sites x {HIDDEN}, "
            f"{size / 2**20:.0f} MiB, written in {time.perf_counter() - start:.0f} s"
        )
        commands = [
            ["analyze", "--directory", str(run)],
            ["plot", str(run), "--out", f"{tmp}/plots"],
            ["probe", str(run)],
            ["probe", str(run), "--max-samples", "0"],
            ["report", str(run), "-o", f"{tmp}/report.html"],
            ["export", str(run), "--site", "layer_1", "--to", "npy", "--out", f"{tmp}/npy"],
            ["export", str(run), "--site", "layer_1", "--to", "parquet", "--out", f"{tmp}/pq"],
        ]
        print("| command | time | peak memory (RSS) |\n|---|---|---|")
        for args in commands:
            peak, seconds, _ = measure(*args)
            shown = " ".join(a.replace(str(run), "RUN").replace(tmp, "OUT") for a in args)
            print(f"| `actcap {shown}` | {seconds:.1f} s | {peak} MB |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else BIG)
