import pytest

from actcap.capture import layer_indices, resolve_sites
from actcap.errors import UnknownNameError
from tests.conftest import TINY_CONFIGS, build_tiny_model


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("0-3", [0, 1, 2, 3]),
        ("0-3,-1", [0, 1, 2, 3, 5]),
        ("-1", [5]),
        ("-2:", [4, 5]),
        (":2", [0, 1]),
        ("1..2", [1, 2]),
        ("3,3,1", [3, 1]),
        (2, [2]),
        (-6, [0]),
    ],
)
def test_layer_indices(spec, expected):
    assert layer_indices(spec, 6) == expected


@pytest.mark.parametrize("spec", ["6", "-7", "0-9", "three", "4-2"])
def test_layer_indices_rejects(spec):
    with pytest.raises(UnknownNameError) as e:
        layer_indices(spec, 6)
    assert str(spec).split("-")[0] in str(e.value) or "range" in str(e.value)


def test_out_of_range_message_lists_valid_range():
    with pytest.raises(UnknownNameError, match=r"valid indices are 0\.\.5"):
        layer_indices("8", 6)


def test_resolve_default_is_embeddings_plus_every_layer(tiny_lm):
    sites = resolve_sites(tiny_lm.model, tiny_lm.layout)
    assert [s.name for s in sites] == ["embeddings", "layer_0", "layer_1", "layer_2"]
    assert sites[0].hook == "input" and sites[0].module_path == "model.layers.0"
    assert sites[1].module_path == "model.layers.0"


def test_resolve_mixed_request(tiny_lm):
    sites = resolve_sites(
        tiny_lm.model,
        tiny_lm.layout,
        ["embeddings", 0, "layer_-1.mlp", "final_norm", "model.layers.1.self_attn.o_proj"],
    )
    assert [s.name for s in sites] == [
        "embeddings",
        "layer_0",
        "layer_2.mlp",
        "final_norm",
        "model.layers.1.self_attn.o_proj",
    ]
    assert sites[2].module_path == "model.layers.2.mlp"
    assert sites[3].module_path == "model.norm"


def test_resolve_kinds(tiny_lm):
    sites = resolve_sites(tiny_lm.model, tiny_lm.layout, "0-1", kinds=("resid", "attn", "mlp"))
    assert [s.name for s in sites] == [
        "layer_0",
        "layer_0.attn",
        "layer_0.mlp",
        "layer_1",
        "layer_1.attn",
        "layer_1.mlp",
    ]
    assert sites[1].module_path == "model.layers.0.self_attn"


def test_unknown_site_lists_valid_names_and_close_matches(tiny_lm):
    with pytest.raises(UnknownNameError) as e:
        resolve_sites(tiny_lm.model, tiny_lm.layout, ["model.layers.0.self_atn"])
    msg = str(e.value)
    assert "model.layers.0.self_attn" in msg and "embeddings" in msg and "layer_0..layer_2" in msg


def test_out_of_range_layer_name(tiny_lm):
    with pytest.raises(UnknownNameError, match="3 layers"):
        resolve_sites(tiny_lm.model, tiny_lm.layout, ["layer_7"])


def test_unknown_kind(tiny_lm):
    with pytest.raises(UnknownNameError, match="resid, attn, mlp"):
        resolve_sites(tiny_lm.model, tiny_lm.layout, None, kinds=("ffn",))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_architecture_resolves_all_kinds(model_type):
    from actcap.models import find_layout

    model = build_tiny_model(model_type)
    layout = find_layout(model)
    assert layout.num_layers == 3
    sites = resolve_sites(model, layout, None, kinds=("resid", "attn", "mlp"))
    assert len(sites) == 1 + 3 * 3
    names = dict(model.named_modules())
    assert all(s.module_path in names for s in sites)
    assert resolve_sites(model, layout, ["final_norm"])[0].module_path in names


def test_generic_fallback_finds_blocks_of_unknown_architecture():
    from actcap.models import find_layout

    model = build_tiny_model("llama")
    model.config.model_type = "something_new"
    layout = find_layout(model)
    assert layout.blocks_path == "model.layers"
    assert layout.final_norm_path == "model.norm"


def test_site_grammar_round_trip_and_network_order() -> None:
    """One grammar (storage.names) formats, parses and orders the names capture writes."""
    from actcap.capture.sites import site_names as capture_site_names
    from actcap.storage import names

    for index in (0, 3, 11):
        for kind in names.SITE_KINDS:
            assert names.parse_layer_site(names.layer_site(index, kind)) == (index, kind)
    assert names.layer_site(2, "mlp") == "layer_2.mlp"
    assert names.parse_layer_site("layer_-1.attn") == (-1, "attn")  # a request from the end
    for other in ("embeddings", "final_norm", "layer_2.mpl", "model.layers.0.mlp", "layer_"):
        assert names.parse_layer_site(other) is None
    canonical = names.site_names(11)
    assert capture_site_names is names.site_names
    assert canonical[0] == "embeddings" and canonical[-1] == "final_norm"
    assert canonical[1:4] == ["layer_0", "layer_0.attn", "layer_0.mlp"]
    shuffled = [*reversed(canonical), "lm_head"]
    assert sorted(shuffled, key=names.site_sort_key) == [*canonical, "lm_head"]  # 10 after 9
    assert names.residual_sites(
        ["layer_10", "layer_2.attn", "final_norm", "layer_2", "embeddings"]
    ) == [
        "embeddings",
        "layer_2",
        "layer_10",
    ]


def test_resolved_sites_follow_the_grammar(tiny_lm) -> None:
    from actcap.storage.names import parse_layer_site

    lm = tiny_lm
    sites = resolve_sites(lm.model, lm.layout, ["layer_-1.mlp", "layer_0", "embeddings"])
    n = lm.layout.num_layers
    assert [s.name for s in sites] == [f"layer_{n - 1}.mlp", "layer_0", "embeddings"]
    assert parse_layer_site(sites[0].name) == (n - 1, "mlp")
    assert sites[0].module_path == lm.layout.child_path(n - 1, "mlp")
