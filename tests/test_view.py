"""actcap view: the JSON API, paging of large runs, safety of the server, and the command."""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import re
import shutil
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actcap.analysis import logit_lens
from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec
from actcap.cli.main import cli
from actcap.models import load_model
from actcap.storage import ActivationFile, open_run
from actcap.view import STATIC, ModelHolder, RunView, ViewApp, ViewServer
from tests.conftest import DATA, REPO, build_tiny_model, build_tokenizer

N_QUESTIONS = 24
HOSTILE_ID = '"><img src=x onerror="window.__pwned=1">'
HOSTILE_QUESTION = "<script>window.__pwned=1</script> Which of these?"
HOSTILE_ANSWER = '"><img src=x onerror="window.__pwned=1"> B'
HOSTILE_CATEGORY = "<b onmouseover=window.__pwned=1>religions</b>"
HOSTILE_BENCHMARK = "<img src=x onerror=window.__pwned=1>"
_BUILT: dict[str, tuple[Path, Path]] = {}


def build_view_runs(base: Path, model_dir: Path) -> tuple[Path, Path]:
    """Two runs on the same questions (cached per session): A with the tiny model, one file per
    sample and hostile strings in two questions; B with another tiny model, in shards."""
    key = str(model_dir)
    if key in _BUILT:
        return _BUILT[key]
    bench = load_benchmark(f"mmlu:{DATA / 'mmlu' / 'test' / 'world_religions_test.csv'}").limited(
        N_QUESTIONS
    )
    other = base / "tiny-llama-seed1"
    build_tiny_model("llama", seed=1).save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    a, b = base / "alpha", base / "beta"
    for out, model, storage, verify in ((a, model_dir, "files", 1), (b, other, "shards", 0)):
        run_benchmark(
            load_model(str(model), device="cpu"),
            bench,
            capture=CaptureSpec(),
            options=EvalOptions(batch_size=8),
            out=out,
            progress=False,
            storage=storage,
            verify=verify,
        )
    make_hostile(a)
    _BUILT[key] = (a, b)
    return a, b


def make_hostile(run: Path) -> None:
    """Put markup in run A's records: an id, a question, an answer, a category, the benchmark."""
    lines = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    lines[0].update(id=HOSTILE_ID, question=HOSTILE_QUESTION, response=HOSTILE_ANSWER)
    lines[0]["prompt"] = HOSTILE_QUESTION + lines[0]["prompt"]
    lines[1]["category"] = HOSTILE_CATEGORY
    (run / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = json.loads((run / "run.json").read_text())
    config["benchmark"] = HOSTILE_BENCHMARK
    (run / "run.json").write_text(json.dumps(config))


class Served:
    """A view server on a free port, in a thread."""

    def __init__(self, app: ViewApp, host: str = "127.0.0.1") -> None:
        self.server = ViewServer(app, host, 0)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def raw(
        self, path: str, host: str | None = None, method: str = "GET"
    ) -> tuple[int, bytes, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host != "":  # "": no Host header at all
            conn.putheader("Host", host or f"127.0.0.1:{self.port}")
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, body, response.headers

    def get(self, path: str, **params: Any) -> tuple[int, Any]:
        from urllib.parse import urlencode

        status, body, _ = self.raw(path + ("?" + urlencode(params) if params else ""))
        return status, json.loads(body)

    def ok(self, path: str, **params: Any) -> Any:
        status, data = self.get(path, **params)
        assert status == 200, data
        return data

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_app(runs: list[Path], model: str | None = "auto", max_samples: int = 300) -> ViewApp:
    views = [RunView(r) for r in runs]
    if model is None:
        holders: list[ModelHolder | None] = [None] * len(views)
    else:
        from actcap.view import model_spec

        holders = [
            ModelHolder(model_spec(v.config, None if model == "auto" else model), "cpu")
            for v in views
        ]
    return ViewApp(views, holders, max_samples)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    return build_view_runs(tmp_path_factory.mktemp("view-runs"), tiny_model_dir)


def loaded(app: ViewApp) -> ViewApp:
    """The app with its models loaded (token text waits for them; the lens too)."""
    app.start_models()
    for holder in app.holders:
        if holder is not None:
            holder.get()
    return app


@pytest.fixture(scope="module")
def served(runs: tuple[Path, Path]) -> Iterator[Served]:
    s = Served(loaded(make_app(list(runs))))
    yield s
    s.close()


def ids_of(run: Path) -> list[str]:
    return [e.id for e in open_run(run).entries]


def test_summary_has_accuracy_model_options_and_verification(served, runs):
    results = json.loads((runs[0] / "results.json").read_text())
    s = served.ok("/api/summary", run=0)
    assert s["score"]["accuracy"] == results["accuracy"]
    assert s["score"]["per_category"] == results["per_category"]
    assert s["model"] == open_run(runs[0]).config["model"]
    assert s["benchmark"] == HOSTILE_BENCHMARK
    assert s["options"]["batch_size"] == 8
    assert s["verification"]["passed"] is True and s["verification"]["n_checked"] == 1
    assert s["n_samples"] == s["n_captured"] == N_QUESTIONS
    assert served.ok("/api/summary", run=1)["verification"] is None  # B ran with verify=0


def test_question_table_pages_filters_and_sorts(served, runs):
    entries = open_run(runs[0]).entries
    right = [e.id for e in entries if e.correct]
    page = served.ok("/api/samples", run=0, limit=10)
    assert page["total"] == page["matched"] == N_QUESTIONS and len(page["rows"]) == 10
    assert [r["id"] for r in page["rows"]] == [e.id for e in entries[:10]]
    second = served.ok("/api/samples", run=0, limit=10, offset=20)
    assert [r["id"] for r in second["rows"]] == [e.id for e in entries[20:]]
    got = served.ok("/api/samples", run=0, grade="right", limit=200)
    assert [r["id"] for r in got["rows"]] == right and got["matched"] == len(right)
    wrong = served.ok("/api/samples", run=0, grade="wrong", limit=200)
    assert wrong["matched"] == N_QUESTIONS - len(right)
    assert all(r["correct"] is False for r in wrong["rows"])
    hostile = served.ok("/api/samples", run=0, q="SCRIPT>window")
    assert [r["id"] for r in hostile["rows"]] == [HOSTILE_ID]
    assert hostile["rows"][0]["question"] == HOSTILE_QUESTION
    by_category = served.ok("/api/samples", run=0, category=HOSTILE_CATEGORY)
    assert [r["id"] for r in by_category["rows"]] == [entries[1].id]
    asc = served.ok("/api/samples", run=0, sort="id", limit=200)["rows"]
    desc = served.ok("/api/samples", run=0, sort="id", desc=1, limit=200)["rows"]
    assert [r["id"] for r in asc] == sorted((e.id for e in entries), key=str.lower)
    assert [r["id"] for r in desc] == [r["id"] for r in reversed(asc)]
    graded = served.ok("/api/samples", run=0, sort="correct", desc=1, limit=200)["rows"]
    assert [r["correct"] for r in graded] == sorted((r["correct"] for r in graded), reverse=True)
    assert served.ok("/api/samples", run=0, limit=10_000)["limit"] == 200
    assert served.get("/api/samples", run=0, grade="maybe")[0] == 400
    assert served.get("/api/samples", run=0, sort="file")[0] == 400
    assert served.get("/api/samples", run=0, offset="x")[0] == 400
    assert served.get("/api/samples", run=7)[0] == 404


def test_question_tokens_are_decoded_with_the_runs_model(served, runs, tiny_tokenizer):
    sample_id = ids_of(runs[0])[3]
    d = served.ok("/api/sample", run=0, id=sample_id)
    with ActivationFile(open_run(runs[0]).find(sample_id).source(runs[0])) as f:  # type: ignore[arg-type]
        ids = f.get("input_ids").tolist()
        assert d["layer_sites"] == f.sites == ["embeddings", "layer_0", "layer_1", "layer_2"]
    assert [t["id"] for t in d["tokens"]] == ids
    assert d["decoded"] is True
    assert [t["text"] for t in d["tokens"]] == [tiny_tokenizer.decode([i]) for i in ids]
    assert "file" not in d["record"] and d["record"]["question"]
    no_model = Served(make_app([runs[0]], model=None))
    try:
        bare = no_model.ok("/api/sample", run=0, id=sample_id)
        assert bare["decoded"] is False and [t["id"] for t in bare["tokens"]] == ids
        assert all(t["text"] is None for t in bare["tokens"])
        lens = no_model.ok("/api/lens", run=0, id=sample_id, token=2)
        assert lens["available"] is False and "--no-model" in lens["message"]
    finally:
        no_model.close()


def _last_vectors(run: Path, site: str) -> tuple[np.ndarray, np.ndarray]:
    info = open_run(run)
    rows, grades = [], []
    for e, src in info.sample_paths():
        with ActivationFile(src) as f:
            rows.append(f.get(site)[-1].double().numpy())
        grades.append(e.correct)
    return np.stack(rows), np.array(grades, dtype=object)


def test_run_wide_statistics_read_a_bounded_sample(runs):
    from actcap.storage import ManifestEntry
    from actcap.view.aggregate import bounded_sample

    entries = [
        ManifestEntry(f"q{i}", f"samples/q{i}.safetensors", {"correct": i % 10 == 0})
        for i in range(100_000)
    ]
    picked = bounded_sample(entries, 300)
    assert 290 <= len(picked) <= 310
    assert sum(bool(e.correct) for e in picked) == 30  # each grade in its share
    assert picked[0].id == "q0" and picked[-1].id == "q99999"  # spread over the whole run
    assert bounded_sample(entries[:24], 300) == entries[:24]
    s = Served(make_app([runs[0]], model=None, max_samples=10))
    try:
        n_right = sum(bool(e.correct) for e in open_run(runs[0]).entries)
        profile = s.ok("/api/profile", run=0, stat="norm")
        assert profile["n"] == n_right + 10 < N_QUESTIONS  # 10 wrong at least, every right one
        assert len(s.ok("/api/similarity", run=0, layer="layer_0")["ids"]) == profile["n"]
    finally:
        s.close()


def test_heatmap_and_profile_match_the_stored_activations(served, runs):
    sample_id = ids_of(runs[0])[5]
    h = served.ok("/api/heatmap", run=0, id=sample_id, stat="norm")
    src = open_run(runs[0]).find(sample_id).source(runs[0])
    with ActivationFile(src) as f:  # type: ignore[arg-type]
        for site, row in zip(h["sites"], h["values"], strict=True):
            expected = torch.linalg.vector_norm(f.get(site).float(), dim=-1).numpy()
            np.testing.assert_allclose(row, expected, rtol=1e-5)
        mid = f.get("layer_1").double().numpy()
    x, grades = _last_vectors(runs[0], "layer_1")
    diff = x[grades == True].mean(0) - x[grades == False].mean(0)  # noqa: E712
    unit = diff / np.linalg.norm(diff)
    p = served.ok("/api/heatmap", run=0, id=sample_id, stat="proj", layer="layer_1")
    np.testing.assert_allclose(p["values"][2], mid @ unit, rtol=1e-4, atol=1e-6)
    assert p["line"][2] == p["values"][2][-1]
    prof = served.ok("/api/profile", run=0, stat="proj", layer="layer_1")
    assert prof["n"] == N_QUESTIONS
    np.testing.assert_allclose(prof["mean"][2], (x @ unit).mean(), rtol=1e-4)
    np.testing.assert_allclose(prof["right"][2], (x[grades == True] @ unit).mean(), rtol=1e-4)  # noqa: E712
    norms = served.ok("/api/profile", run=0, stat="norm")
    np.testing.assert_allclose(norms["mean"][2], np.linalg.norm(x, axis=1).mean(), rtol=1e-4)
    assert served.get("/api/heatmap", run=0, id=sample_id, stat="proj", layer="layer_9")[0] == 404
    assert served.get("/api/heatmap", run=0, id=sample_id, stat="max")[0] == 400


def test_direction_needs_right_and_wrong_answers(runs, tmp_path):
    run = tmp_path / "all-right"
    shutil.copytree(runs[0], run)
    lines = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    (run / "manifest.jsonl").write_text(
        "".join(json.dumps({**x, "correct": True}) + "\n" for x in lines)
    )
    s = Served(make_app([run], model=None))
    try:
        got = s.ok("/api/heatmap", run=0, id=lines[2]["id"], stat="proj", layer="layer_1")
        assert got["available"] is False and "right and wrong" in got["message"]
        assert s.ok("/api/profile", run=0, stat="proj", layer="layer_1")["available"] is False
        assert s.ok("/api/heatmap", run=0, id=lines[2]["id"], stat="norm")["available"] is True
    finally:
        s.close()


def test_reduced_and_generated_runs(tmp_path, tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    mc = load_benchmark(f"mmlu:{DATA / 'mmlu' / 'test' / 'world_religions_test.csv'}").limited(3)
    math = load_benchmark(f"gsm8k:{DATA / 'gsm8k' / 'test.jsonl'}").limited(1)
    last, generated = tmp_path / "last", tmp_path / "generated"
    spec = CaptureSpec(token_selection="last", dtype="float16")
    run_benchmark(lm, mc, capture=spec, out=last, progress=False, verify=0)
    run_benchmark(
        lm,
        math,
        capture=CaptureSpec(capture_generated=True),
        options=EvalOptions(max_new_tokens=4),
        out=generated,
        progress=False,
        verify=0,
    )
    s = Served(loaded(make_app([last, generated])))
    try:
        sample_id = ids_of(last)[0]
        d = s.ok("/api/sample", run=0, id=sample_id)
        assert d["token_selection"] == "last" and [t["text"] for t in d["tokens"]] == ["last"]
        h = s.ok("/api/heatmap", run=0, id=sample_id, stat="norm")
        assert [len(v) for v in h["values"]] == [1, 1, 1, 1]
        assert len(s.ok("/api/lens", run=0, id=sample_id, token=-1)["rows"]) == 4
        sample_id = ids_of(generated)[0]
        d = s.ok("/api/sample", run=1, id=sample_id)
        with ActivationFile(open_run(generated).find(sample_id).source(generated)) as f:  # type: ignore[arg-type]
            n_prompt, n_out = f.shape("input_ids")[-1], f.shape("output_ids")[-1]
            rows = f.shape("layer_0")[0]
            ids = (f.get("input_ids").tolist() + f.get("output_ids").tolist())[:rows]
        assert n_out > 1 and n_prompt < rows <= n_prompt + n_out  # the answer's tokens too
        assert [t["id"] for t in d["tokens"]] == ids and d["decoded"] is True
        assert [t["generated"] for t in d["tokens"]] == [False] * n_prompt + [True] * (
            rows - n_prompt
        )
        h = s.ok("/api/heatmap", run=1, id=sample_id, stat="norm")
        assert {len(v) for v in h["values"]} == {rows}
    finally:
        s.close()


def test_logit_lens_of_a_token(served, runs, tiny_model_dir):
    sample_id = ids_of(runs[0])[4]
    got = served.ok("/api/lens", run=0, id=sample_id, token=3)
    src = open_run(runs[0]).find(sample_id).source(runs[0])
    expected = logit_lens(src, load_model(str(tiny_model_dir), device="cpu"), token=3, k=5)  # type: ignore[arg-type]
    assert got["available"] is True
    assert [r["site"] for r in got["rows"]] == [r.site for r in expected]
    assert [r["tokens"] for r in got["rows"]] == [r.tokens for r in expected]
    assert served.get("/api/lens", run=0, id=sample_id, token=10_000)[0] == 422


def test_a_model_that_cannot_load_is_explained(runs):
    views = [RunView(runs[0])]
    s = Served(ViewApp(views, [ModelHolder("/no/such/model-folder", "cpu")], 300))
    try:
        sample_id = views[0].entries[2].id
        lens = s.ok("/api/lens", run=0, id=sample_id, token=1)
        assert lens["available"] is False and "could not be loaded" in lens["message"]
        assert s.ok("/api/sample", run=0, id=sample_id)["decoded"] is False
        assert s.ok("/api/runs")["runs"][0]["model"]["state"] == "failed"
    finally:
        s.close()


def test_probe_by_layer_and_without_scikit_learn(served, runs, monkeypatch):
    p = served.ok("/api/probe", run=0, target="correct")
    assert p["available"] is True and p["sites"] == ["embeddings", "layer_0", "layer_1", "layer_2"]
    assert all(0 <= a <= 1 for a in p["accuracy"]) and p["n"] == N_QUESTIONS
    right = sum(bool(e.correct) for e in open_run(runs[0]).entries)
    assert p["baseline"][0] == pytest.approx(max(right, N_QUESTIONS - right) / N_QUESTIONS)
    assert served.get("/api/probe", run=0, target="file")[0] == 400
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    fresh = Served(make_app([runs[0]], model=None))
    try:
        got = fresh.ok("/api/probe", run=0, target="correct")
        assert got["available"] is False and "actcap[probe]" in got["message"]
    finally:
        fresh.close()


def test_similarity_matrix_of_a_layer(served, runs):
    m = served.ok("/api/similarity", run=0, layer="layer_2")
    n = len(m["ids"])
    assert n == N_QUESTIONS and len(m["matrix"]) == n and all(len(r) == n for r in m["matrix"])
    assert all(abs(m["matrix"][i][i] - 1) < 1e-4 for i in range(n))
    grades = m["correct"]
    assert grades == sorted(grades, key=lambda c: {True: 0, False: 1, None: 2}[c])
    a, b = m["ids"][0], m["ids"][-1]
    pair = served.ok("/api/pair", run=0, a=a, b=b)
    assert pair["a"]["id"] == a and pair["b"]["id"] == b
    assert pair["cosine"]["sites"][-1] == "layer_2"
    assert pair["cosine"]["last"][-1] == pytest.approx(m["matrix"][0][-1], abs=1e-4)


def test_two_runs_side_by_side(served, runs):
    a, b = open_run(runs[0]), open_run(runs[1])
    grades_b = {e.id: e.correct for e in b.entries}
    shared = [e for e in a.entries if e.id in grades_b]
    s = served.ok("/api/compare/summary")
    assert s["shared"] == len(shared) == N_QUESTIONS - 1  # A's first id was made hostile
    assert s["counts"]["both_right"] == sum(bool(e.correct and grades_b[e.id]) for e in shared)
    differ = served.ok("/api/compare/questions", agreement="differ", limit=200)
    assert {r["id"] for r in differ["rows"]} == {
        e.id for e in shared if bool(e.correct) != bool(grades_b[e.id])
    }
    q = served.ok("/api/compare/question", id=shared[0].id)
    assert q["a"]["response"] == shared[0].record["response"]
    assert q["cosine"]["sites"] == ["embeddings", "layer_0", "layer_1", "layer_2"]
    assert all(-1.0001 <= c <= 1.0001 for c in q["cosine"]["last"])
    mean = served.ok("/api/compare/cosine")
    assert mean["available"] is True and mean["n"] == len(shared)
    assert served.get("/api/compare/question", id=HOSTILE_ID)[0] == 404


def test_one_run_has_no_comparison(runs):
    s = Served(make_app([runs[1]], model=None))
    try:
        assert s.ok("/api/runs")["compare"] is False
        assert s.get("/api/compare/summary")[0] == 404
    finally:
        s.close()


ESCAPES = [
    "/static/../run.json",
    "/static/%2e%2e/run.json",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2frun.json",
    "/static/app.js/../../run.json",
    "/../../../../etc/passwd",
    "//etc/passwd",
    "/static//etc/passwd",
    "/etc/passwd",
    "/run.json",
    "/manifest.jsonl",
    "/results.json",
    "/samples/",
    "/static/VENDOR.md",
    "/static/chart.js.LICENSE.md",
    "/static/",
    "/api/../run.json",
    "/%2e%2e/run.json",
    "/static/app.js%00.json",
    "/api/sample?run=0&id=../run.json",
    "/api/sample?run=0&id=%2e%2e%2frun.json",
    "/api/sample?run=0&id=/etc/passwd",
    "/api/heatmap?run=0&id=samples/x.safetensors",
    "/api/sample?run=../../etc&id=x",
    "/api/sample?run=-1&id=x",
    "/api/sample?run=%2e%2e&id=x",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_no_path_outside_the_run_can_be_requested(served, runs, path):
    status, body, _ = served.raw(path)
    assert status in (400, 404), (path, status)
    text = body.decode("utf-8", "replace")
    assert "root:" not in text and "run_format_version" not in text and "format_version" not in text
    assert "world_religions" not in text  # nothing of the run's records either


def test_only_the_allow_listed_files_are_served(served):
    for path, (name, kind) in STATIC.items():
        status, body, headers = served.raw(path)
        assert status == 200 and headers["Content-Type"] == kind
        assert body == (REPO / "src" / "actcap" / "view" / "static" / name).read_bytes()
    status, body, headers = served.raw("/")
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "http" not in policy  # nothing from elsewhere
    assert headers["X-Content-Type-Options"] == "nosniff"
    page = body.decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no CDN
    for name in ("app.js", "app.css"):
        text = (REPO / "src" / "actcap" / "view" / "static" / name).read_text()
        assert not re.search(r"https?://", text), name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, name


def test_a_manifest_path_out_of_the_run_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    lines = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    secret = tmp_path / "secret.safetensors"
    shutil.copy(run / lines[3]["file"], secret)
    lines[3]["file"] = "../secret.safetensors"
    lines[4]["file"] = str(secret)  # absolute
    (run / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = Served(make_app([run], model=None))
    try:
        for line in lines[3:5]:
            for path in ("/api/heatmap", "/api/sample"):
                status, data = s.get(path, run=0, id=line["id"])
                assert status == 422 and "corrupt" in data["error"], data
                assert "values" not in data and "tokens" not in data
        assert s.ok("/api/heatmap", run=0, id=lines[5]["id"])["available"] is True
    finally:
        s.close()


def test_other_hosts_and_methods_are_refused(served):
    assert served.raw("/api/runs", host="evil.example:80")[0] == 403
    assert served.raw("/", host=f"attacker.test:{served.port}")[0] == 403
    assert served.raw("/api/runs", host="")[0] == 403
    assert served.raw("/api/runs", host=f"localhost:{served.port}")[0] == 200
    assert served.raw("/api/runs", method="POST")[0] == 501
    assert served.raw("/api/runs", method="DELETE")[0] == 501
    assert served.raw("/api/summary?run=0", method="HEAD")[0] == 200


def test_a_run_of_100000_questions_opens_one_page(tmp_path):
    run = tmp_path / "big"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps({"run_format_version": 1, "format_version": 1, "model": "m", "capture": None})
    )
    cats = ["alpha", "beta", "gamma", "delta"]
    with open(run / "manifest.jsonl", "w") as f:
        for i in range(100_000):
            record = {
                "id": f"q{i:06d}",
                "file": None,
                "question": f"question number {i}?",
                "response": "B",
                "reference": "B" if i % 3 else "C",
                "correct": bool(i % 3),
                "category": cats[i % 4],
            }
            f.write(json.dumps(record) + "\n")
    t0 = time.perf_counter()
    s = Served(make_app([run], model=None))
    try:
        status, body, _ = s.raw("/api/samples?run=0&offset=0&limit=50")
        elapsed = time.perf_counter() - t0
        page = json.loads(body)
        assert status == 200 and len(page["rows"]) == 50 and page["total"] == 100_000
        assert len(body) < 30_000  # one page, not the run
        assert elapsed < 20, elapsed  # opening the manifest and one page (~2 s on a laptop)
        wrong = s.ok("/api/samples", run=0, grade="wrong", category="beta", limit=50)
        assert wrong["matched"] == sum(1 for i in range(100_000) if i % 3 == 0 and i % 4 == 1)
        assert len(wrong["rows"]) == 50
        last = s.ok("/api/samples", run=0, sort="id", desc=1, limit=50, offset=99_990)
        assert [r["id"] for r in last["rows"]] == [f"q{i:06d}" for i in range(9, -1, -1)]
        assert s.ok("/api/samples", run=0, q="number 4242?")["matched"] == 1
        summary = s.ok("/api/summary", run=0)
        assert summary["n_captured"] == 0 and summary["score"]["n"] == 100_000
        probe = s.ok("/api/probe", run=0)  # no activations: said so, nothing loaded
        assert probe["available"] is False and "activations" in probe["message"]
    finally:
        s.close()


def test_a_run_at_a_url_in_shards(tmp_path, tiny_model_dir):
    import uuid

    url = f"memory://actcap-view-{uuid.uuid4().hex[:8]}/run"
    bench = load_benchmark(f"mmlu:{DATA / 'mmlu' / 'test' / 'world_religions_test.csv'}").limited(6)
    run_benchmark(
        load_model(str(tiny_model_dir), device="cpu"),
        bench,
        capture=CaptureSpec(),
        options=EvalOptions(batch_size=6),
        out=url,
        progress=False,
        verify=0,
    )
    s = Served(ViewApp([RunView(url)], [None], 300))
    try:
        first = s.ok("/api/samples", run=0)["rows"][0]["id"]
        h = s.ok("/api/heatmap", run=0, id=first, stat="norm")
        assert h["available"] is True and len(h["values"]) == 4
        assert s.ok("/api/profile", run=0, stat="norm")["n"] == 6
    finally:
        s.close()


def test_the_command_prints_the_address_and_opens_nothing(runs, monkeypatch):
    opened: list[str] = []
    served: list[ViewServer] = []
    monkeypatch.setattr("webbrowser.open", lambda url, *a, **k: opened.append(url))
    monkeypatch.setattr(ViewServer, "serve_forever", lambda self, *a: served.append(self))
    runner = CliRunner()
    result = runner.invoke(cli, ["view", str(runs[0]), "--port", "0", "--no-model"])
    assert result.exit_code == 0, result.output
    assert served[0].host == "127.0.0.1" and served[0].loopback
    assert f"serving at http://127.0.0.1:{served[0].port}/" in result.output
    assert "WARNING" not in result.output and opened == []
    result = runner.invoke(
        cli, ["view", str(runs[0]), str(runs[1]), "--port", "0", "--open", "--no-model"]
    )
    assert result.exit_code == 0, result.output
    assert opened == [served[1].url] and "alpha" in result.output and "beta" in result.output
    result = runner.invoke(cli, ["view", str(runs[0]), "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 0
    assert "WARNING: listening on 0.0.0.0" in result.stderr and "no login" in result.stderr
    assert not served[2].loopback


def test_the_command_refuses_bad_input(runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["view", str(runs[0]), str(runs[1]), str(runs[0])])
    assert result.exit_code == 2 and "one or two runs" in result.output
    result = runner.invoke(cli, ["view", str(tmp_path)])
    assert result.exit_code == 1 and "not a run directory" in result.output
    assert "Traceback" not in result.output
    with socket_taken() as port:
        result = runner.invoke(cli, ["view", str(runs[0]), "--port", str(port), "--no-model"])
    assert result.exit_code == 1 and "in use" in result.output and "--port 0" in result.output


class socket_taken:  # noqa: N801 - used as a context manager
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_static_files_ship_in_the_wheel_with_the_vendored_licence():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["actcap"]
    static = REPO / "src" / "actcap" / "view" / "static"
    names = {name for name, _ in STATIC.values()} | {"chart.js.LICENSE.md", "VENDOR.md"}
    for name in names:
        assert (static / name).is_file()
        assert any(fnmatch.fnmatch(f"view/static/{name}", g) for g in globs), name
    vendor = (static / "VENDOR.md").read_text()
    digest = hashlib.sha256((static / "chart.umd.js").read_bytes()).hexdigest()
    assert digest in vendor and "4.6.1" in vendor
    assert (static / "chart.umd.js").read_text().startswith("/*!\n * Chart.js v4.6.1")
    assert "MIT" in (static / "chart.js.LICENSE.md").read_text()


@pytest.mark.parametrize(
    "query",
    [
        "/api/summary?run=%C2%B2",  # '²': str.isdigit() says yes, int() says no (was a 500)
        "/api/summary?run=%D9%A3",  # an Arabic-Indic three: int() would take it
        "/api/summary?run=" + "9" * 5000,  # beyond int()'s digit limit
        "/api/samples?run=0&offset=%C2%B2",
        "/api/samples?run=0&limit=1_0",
        "/api/samples?run=0&offset=%203",
        "/api/lens?run=0&id=x&token=%EF%BC%91",  # a full-width one
    ],
)
def test_numeric_parameters_take_ascii_digits_only(served, query):
    status, body, _ = served.raw(query)
    assert status == 400, (query, status, body[:200])
    assert "Traceback" not in body.decode() and "error" in json.loads(body)


def test_a_bug_is_a_500_without_a_traceback(served, monkeypatch, capfd):
    def broken(params: dict[str, str]) -> dict[str, Any]:
        raise RuntimeError("secret detail at /home/someone/x")

    monkeypatch.setitem(served.server.app.routes, "/api/runs", broken)
    status, body, _ = served.raw("/api/runs")
    assert status == 500
    data = json.loads(body)
    assert "internal error" in data["error"] and "secret" not in data["error"]
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "RuntimeError" in err


def test_results_of_the_wrong_types_are_sent_as_null(runs, tmp_path):
    """``"accuracy": "x"`` broke the run page (``toFixed is not a function``): numbers or null."""
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "results.json").write_text(
        json.dumps(
            {
                "accuracy": "x",
                "n": "8",
                "n_correct": [1],
                "wall_seconds": "slow",
                "per_category": {"a": "x", "b": {"accuracy": "y", "n": {"k": 1}}, "c": None},
                "verification": {"passed": "yes", "n_checked": "1", "tolerance": [1]},
            }
        )
    )
    (run / "run.json").write_text(
        json.dumps({**json.loads((run / "run.json").read_text()), "sites": "layer_0"})
    )
    status, s = make_app([run], model=None).answer("/api/summary", {"run": "0"})
    assert status == 200
    blank = {"accuracy": None, "n": None, "n_correct": None}
    assert s["score"] == {**blank, "per_category": {"a": blank, "b": blank, "c": blank}}
    assert s["wall_seconds"] is None and s["sites"] == []
    assert s["verification"] == {
        "passed": None,
        "n_checked": None,
        "n_samples": None,
        "tolerance": None,
        "problems": [],
    }
    app = (REPO / "src" / "actcap" / "view" / "static" / "app.js").read_text()
    assert 'typeof score.accuracy === "number" ? score.accuracy.toFixed(3) : "unknown"' in app


def test_a_link_out_of_the_run_is_not_named(runs, tmp_path):
    """An error names the link inside the run, never where it leads outside."""
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    line = json.loads((run / "manifest.jsonl").read_text().splitlines()[3])
    outside = tmp_path / "elsewhere" / "private"
    outside.mkdir(parents=True)
    shutil.move(run / line["file"], outside / "secret.safetensors")
    (run / line["file"]).symlink_to(outside / "secret.safetensors")
    s = Served(make_app([run], model=None))
    try:
        for path in ("/api/heatmap", "/api/sample"):
            status, body, _ = s.raw(f"{path}?run=0&id={line['id']}")
            text = body.decode()
            assert status == 422 and "leads out of the run" in text, text
            assert "elsewhere" not in text and "secret.safetensors" not in text
    finally:
        s.close()
