"""Config: overlays, overrides, and clear errors at load time."""

import os

import pytest

import longctx
from longctx.config import ConfigError, load_config, save_config

TINY = "experiments/configs/tiny.yaml"


def test_tiny_overlays_base_and_defaults():
    cfg = load_config(TINY)
    assert cfg.model.d_model == 128  # tiny.yaml
    assert cfg.model.max_seq_len == 1024  # tiny.yaml overrides base.yaml's 8192
    assert cfg.model.attention.impl == "auto"  # base.yaml
    assert cfg.optim.b1 == 0.9  # dataclass default
    assert cfg.model.resolved_head_dim == 32


def test_overrides_are_typed_and_last():
    cfg = load_config(TINY, ["model.d_model=64", "optim.lr=1e-2", "model.attention.window=null",
                             "model.tie_embeddings=false", "optim.weight_decay=0"])
    assert cfg.model.d_model == 64
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.model.attention.window is None and cfg.model.tie_embeddings is False
    assert isinstance(cfg.optim.weight_decay, float)


@pytest.mark.parametrize("override,match", [
    ("model.d_modle=64", r"unknown config key 'model.d_modle'; did you mean model.d_model"),
    ("modle.d_model=64", r"unknown config key 'modle'; did you mean model"),
    ("model.attention.backnd=full", r"did you mean model.attention.backend"),
    ("model.n_layers=two", r"model.n_layers='two': expected int, got str"),
    ("model.tie_embeddings=3", r"model.tie_embeddings=3: expected bool"),
    ("model.n_kv_heads=3", r"model.n_heads=4 must be divisible by model.n_kv_heads=3"),
    ("model.attention.backend=mamba", r"'mamba' is not registered; registered backends: \[.*'full'"),
    ("model.attention.impl=fast", r"model.attention.impl='fast'; expected one of"),
    ("model.dtype=float16", r"model.dtype='float16'; expected one of"),
    ("model.segment_len=-1", r"model.segment_len=-1 must be >= 0"),
    ("data.task=lambada", r"data.task='lambada'; expected one of"),
    ("data.num_kv_pairs=100", r"data: mqar: .*num_kv_pairs=100"),
    ("optim.schedule=step", r"optim.schedule='step'; expected one of"),
    ("model.d_model", r"must look like key.sub=value"),
])
def test_errors_name_the_key_and_the_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_segment_len_longer_than_the_kv_cache_is_refused():
    with pytest.raises(ConfigError, match=r"data.seq_len=2048 > model.max_seq_len=1024"):
        load_config(TINY, ["model.segment_len=256", "data.seq_len=2048"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):  # safe_load refuses tags
        load_config(str(unsafe))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["model.attention.window=16", "optim.lr=2e-3"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_ablation_chain(tmp_path):
    (tmp_path / "parent.yaml").write_text(f"base: {os.path.abspath(TINY)}\nmodel:\n  n_layers: 3\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel:\n  d_model: 96\n")
    cfg = longctx.load_config(str(tmp_path / "child.yaml"))
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.vocab_size) == (3, 96, 256)
