"""Property-based tests: readers and loaders answer any input with a result or our own error."""

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actcap.bench.sources import load_benchmark, load_gsm8k, load_mmlu
from actcap.errors import ActcapError, BenchmarkError, FormatError
from actcap.storage import SampleMeta, load_activations, read_manifest, save_activations

FUZZ = settings(
    max_examples=int(__import__("os").environ.get("ACTCAP_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_file_reader_on_random_bytes(tmp_path, data):
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    try:
        load_activations(path)
    except ActcapError as e:
        assert str(path) in str(e)


def _valid_bytes(tmp_path):
    path = tmp_path / "valid.safetensors"
    save_activations(
        path,
        {"layer_0": torch.randn(3, 4), "layer_1": torch.randn(4)},
        SampleMeta("p", "r"),
        input_ids=torch.arange(3),
    )
    return path.read_bytes()


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255)
        ),
        min_size=1,
        max_size=8,
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10_000)),
)
def test_file_reader_on_mutated_valid_files(tmp_path, edits, cut):
    data = bytearray(_valid_bytes(tmp_path))
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(data))
    try:
        out = load_activations(path)
    except ActcapError:
        return
    assert isinstance(out["activations"], dict)  # when it loads, it loads whole


@FUZZ
@given(
    header=st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.integers(),
            st.text(max_size=8),
            st.lists(st.integers(), max_size=3),
            st.dictionaries(
                st.text(max_size=6),
                st.one_of(
                    st.integers(min_value=-5, max_value=1 << 62),
                    st.text(max_size=4),
                    st.lists(st.integers(min_value=-2, max_value=1 << 40), max_size=3),
                ),
            ),
        ),
    ),
    payload=st.binary(max_size=64),
)
def test_file_reader_on_crafted_headers(tmp_path, header, payload):
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    try:
        load_activations(path)
    except FormatError:
        pass
    except ActcapError:
        pass


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=40),
            st.builds(
                lambda i, r: json.dumps({"id": i, "response": r}),
                st.text(max_size=10),
                st.text(max_size=10),
            ),
        ),
        max_size=12,
    )
)
def test_manifest_reader(tmp_path, lines):
    path = tmp_path / "manifest.jsonl"
    path.write_text(
        "\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass"
    ) if lines else path.write_text("")
    try:
        entries = read_manifest(path)
    except FormatError as e:
        assert "line" in str(e)
        return
    assert all(isinstance(e.id, str) for e in entries)


record = st.dictionaries(
    st.sampled_from(["question", "answer", "choices", "id", "category", "grader", "other"]),
    st.one_of(
        st.text(max_size=20),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=5), max_size=4),
        st.booleans(),
    ),
)


@FUZZ
@given(
    records=st.lists(st.one_of(record, st.integers(), st.text(max_size=10)), max_size=6),
    junk=st.binary(max_size=30),
)
def test_jsonl_loader(tmp_path, records, junk):
    path = tmp_path / "b.jsonl"
    path.write_bytes(
        ("\n".join(json.dumps(r) for r in records)).encode() + (b"\n" + junk if junk else b"")
    )
    try:
        b = load_benchmark(str(path))
    except BenchmarkError as e:
        assert str(path) in str(e) or "duplicate" in str(e) or "no questions" in str(e)
        return
    assert b.questions and len({q.id for q in b.questions}) == len(b.questions)


@FUZZ
@given(text=st.text(max_size=300))
def test_csv_and_mmlu_and_gsm8k_loaders(tmp_path, text):
    for name, loader in (
        ("b.csv", lambda p: load_benchmark(str(p))),
        ("s_test.csv", load_mmlu),
        ("g.jsonl", load_gsm8k),
    ):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            b = loader(path)
        except BenchmarkError:
            continue
        assert b.questions
