"""Shared prompt prefixes stored once per run (issue #16, part 1)."""

from __future__ import annotations

import pytest
import torch

from actcap.errors import FormatError
from actcap.storage.format import SampleMeta
from actcap.storage.prefixes import (
    MIN_PREFIX_TOKENS,
    common_prefix,
    is_prefix_key,
    prefix_filename,
    prefix_key,
    prefix_location,
    shareable_rows,
)


def test_prefix_key_depends_on_model_dtype_sites_and_tokens():
    base = prefix_key("m", "float32", ["layer_0", "layer_1"], [1, 2, 3])
    assert is_prefix_key(base)
    assert base == prefix_key("m", "float32", ["layer_1", "layer_0"], [1, 2, 3])
    others = {
        prefix_key("m2", "float32", ["layer_0", "layer_1"], [1, 2, 3]),
        prefix_key("m", "float16", ["layer_0", "layer_1"], [1, 2, 3]),
        prefix_key("m", "float32", ["layer_0"], [1, 2, 3]),
        prefix_key("m", "float32", ["layer_0", "layer_1"], [1, 2, 4]),
        prefix_key("m", "float32", ["layer_0", "layer_1"], [12, 3]),
    }
    assert base not in others and len(others) == 5


@pytest.mark.parametrize("key", ["../x", "a" * 63, "A" * 64, "g" * 64, "", "a" * 64 + "/"])
def test_a_corrupt_key_names_no_file(key):
    with pytest.raises(FormatError, match="corrupt"):
        prefix_filename(key)


def test_the_prefix_lies_in_the_samples_own_run():
    key = "a" * 64
    assert prefix_location("/r/samples/q1.safetensors", key) == f"/r/prefixes/{key}.safetensors"
    assert prefix_location("/r/shards/x-00001.shard", key) == f"/r/prefixes/{key}.safetensors"
    assert (
        prefix_location("memory://b/r/shards/x.shard", key)
        == f"memory://b/r/prefixes/{key}.safetensors"
    )


def test_shareable_rows_needs_the_same_tokens_and_a_row_of_its_own():
    n = MIN_PREFIX_TOKENS
    ids = torch.arange(n + 3)
    acts = {"layer_0": torch.zeros(n + 3, 4)}
    assert shareable_rows(acts, ids, list(range(n))) == n
    assert shareable_rows(acts, ids, [7] + list(range(1, n))) == 0  # other tokens
    assert shareable_rows(acts, ids, list(range(n - 1))) == 0  # too short to be worth it
    assert shareable_rows(acts, torch.arange(n), list(range(n))) == 0  # nothing of its own
    assert shareable_rows({"layer_0": torch.zeros(4)}, ids, list(range(n))) == 0  # last/mean


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[1, 2, 3]]) == [1, 2, 3]
    assert common_prefix([]) == []


def test_meta_carries_the_prefix_only_when_there_is_one():
    plain = SampleMeta("p").to_header()
    assert "prefix" not in plain and "prefix_tokens" not in plain
    header = SampleMeta("p", prefix="a" * 64, prefix_tokens=20).to_header()
    back = SampleMeta.from_header(header)
    assert (back.prefix, back.prefix_tokens) == ("a" * 64, 20)
    assert SampleMeta.from_header({**header, "prefix_tokens": "x"}).prefix_tokens == -1
