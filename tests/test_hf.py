"""longctx.hf against transformers itself: tiny random models of every family, logits equal.

Each family is a random ``AutoModelForCausalLM.from_config`` model (weights spread with
``initializer_range=0.2`` so that logits vary), saved with ``save_pretrained``, loaded
with ``longctx.hf.load`` and compared on a short and a 600-token prompt (RoPE scaling
bands and sliding windows only show at length); then saved back with ``longctx.hf.save``
and reloaded by transformers.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from longctx import hf
from longctx.config import ConfigError
from longctx.model import build_model, layout
from longctx.parallel import sharding as shd

# Interop against the real thing: needs the `test` extra (torch, transformers); skipped without.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.interop

V, E, L = 128, 32, 2
COMMON = dict(vocab_size=V, hidden_size=E, intermediate_size=48, num_hidden_layers=L,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
              max_position_embeddings=1024)

FAMILIES = {
    # Llama 3 rope scaling (pre-training length 64, so positions up to 600 use every band)
    "llama3": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=32)),  # window < prompt
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),  # + q/k/v biases
    "qwen2_yarn": (transformers.Qwen2Config, dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128))),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),  # q/k norm, head_dim != E / heads
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)),
    "llama_dynamic": (transformers.LlamaConfig, dict(
        max_position_embeddings=128, attention_bias=True,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
}

PROMPTS = {T: np.random.default_rng(T).integers(0, V, (1, T)) for T in (7, 600)}


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _close(a, b):
    scale = np.abs(b).max()
    np.testing.assert_allclose(a / scale, b / scale, atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    cls, kw = FAMILIES[request.param]
    torch.manual_seed(0)
    config = cls(**{**COMMON, **kw})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = str(tmp_path_factory.mktemp(request.param) / "hf")
    model.save_pretrained(path)
    expected = {T: _torch_logits(model, p) for T, p in PROMPTS.items()}
    expected["prefix"] = _torch_logits(model, PROMPTS[600][:, :7])  # a short prompt
    return request.param, path, expected


@pytest.fixture(scope="module")
def loaded(family):
    name, path, expected = family
    model, cfg = hf.load(path)
    return name, path, expected, model, cfg


def test_logits_match_transformers(loaded):
    """600 tokens, and 7 (HF's own short-prompt run): by causality the first 7 logits of the
    long run, except for dynamic NTK whose frequencies depend on the length (its own run)."""
    name, _, expected, model, cfg = loaded
    logits = np.asarray(model(PROMPTS[600])[0])
    _close(logits, expected[600])
    short = PROMPTS[600][:, :7]
    ref_short = expected["prefix"]
    if cfg.model.rope_scaling.type == "dynamic":
        _close(np.asarray(model(short)[0]), ref_short)
    else:
        _close(logits[:, :7], ref_short)


def test_save_then_transformers_loads_same_logits(loaded, tmp_path):
    name, _, expected, model, cfg = loaded
    out = hf.save(model, cfg, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == json.load(open(os.path.join(out, "config.json")))[
        "architectures"][0]
    _close(_torch_logits(back, PROMPTS[600]), expected[600])


def test_sharded_save_and_mesh_load(tmp_path):
    """Save in shards (index file), load onto an 8-device mesh: same logits as transformers."""
    cls, kw = FAMILIES["qwen3"]
    torch.manual_seed(1)
    ref = transformers.AutoModelForCausalLM.from_config(cls(**{**COMMON, **kw})).eval()
    ref.save_pretrained(str(tmp_path / "src"))
    model, cfg = hf.load(str(tmp_path / "src"))
    out = hf.save(model, cfg, str(tmp_path / "sharded"), max_shard_size=20_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    sharded, _ = hf.load(out, mesh=mesh)
    assert sharded.cfg.scan_layers  # the default: layers 0..L-1 stacked [L, ...]
    wq = sharded.stages[0].blocks[0].mixer.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (L, E // 4, 2, 32)  # `layers` unsharded
    with jax.set_mesh(mesh):
        logits, _ = sharded(PROMPTS[7])
    _close(np.asarray(logits), _torch_logits(ref, PROMPTS[7]))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # HF reads the index
    _close(_torch_logits(back, PROMPTS[7]), _torch_logits(ref, PROMPTS[7]))


def _tiny_llama(path, **kw):
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 1, **kw})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    return str(path)


@pytest.mark.slow
def test_bad_inputs_name_the_file_tensor_or_field(tmp_path):
    src = _tiny_llama(tmp_path / "ok")
    conf = json.load(open(os.path.join(src, "config.json")))

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(src):
            os.link(os.path.join(src, f), d / f)
        os.unlink(d / "config.json")
        json.dump({**conf, **changes}, open(d / "config.json", "w"))
        return str(d)

    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        hf.load(variant("arch", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match="mlp_bias"):
        hf.load(variant("field", mlp_bias=True))
    with pytest.raises(ConfigError, match="longrope"):
        hf.load(variant("rope", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))
    with pytest.raises(hf.CheckpointError, match=r"model.embed_tokens.weight.*\[128, 32\]"):
        hf.load(variant("hidden", hidden_size=64, head_dim=16))  # config and tensors disagree
    # A tensor of the wrong shape / a missing tensor in the file itself.
    with safe_open(os.path.join(src, "model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "shape"
    bad.mkdir()
    json.dump(conf, open(bad / "config.json", "w"))
    save_file({**tensors, "model.norm.weight": np.ones(31, np.float32)},
              str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"model.norm.weight.*\[31\]"):
        hf.load(str(bad))
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"},
              str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match="model.norm.weight.*missing"):
        hf.load(str(bad))
    # A missing shard of a sharded checkpoint; a corrupt file.
    model, cfg = hf.load(src)
    sharded = hf.save(model, cfg, str(tmp_path / "sharded"), max_shard_size=10_000)
    victim = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[1]
    os.rename(os.path.join(sharded, victim), tmp_path / "aside")
    with pytest.raises(hf.CheckpointError, match=victim):
        hf.load(sharded)
    open(os.path.join(sharded, victim), "wb").write(b"\x00" * 64)
    with pytest.raises(hf.CheckpointError, match=victim):
        hf.load(sharded)
    # Export refuses what HF cannot express, and never leaves a half-written directory.
    conv = dataclasses.replace(cfg.model, attention=dataclasses.replace(cfg.model.attention,
                                                                        conv_size=3))
    with pytest.raises(ConfigError, match="conv_size"):
        hf.save(build_model(conv, rngs=nnx.Rngs(0)), conv, str(tmp_path / "never"))
    assert not any(p.name.startswith("never") for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError):
        hf.save(model, cfg, src)


@pytest.mark.slow
def test_bfloat16_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 1})
    ref = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    ref.save_pretrained(str(tmp_path))
    model, _ = hf.load(str(tmp_path))
    ref_f32 = ref.float().eval()
    logits, _ = model(PROMPTS[7])
    _close(np.asarray(logits), _torch_logits(ref_f32, PROMPTS[7]))


@pytest.mark.slow
def test_convert_cli_round_trip_trains_and_resumes(tmp_path):
    """python -m longctx.hf (= python -m longctx.convert): --from-hf writes a run the trainer resumes (one step); --to-hf exports what HF loads."""
    from longctx.hf import cli as convert
    from longctx.config import load_config
    from longctx.train.loop import train

    src = _tiny_llama(tmp_path / "src")
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    run = str(tmp_path / "run")
    convert.main(["--from-hf", src, "--run-dir", run, "--no-progress", "train.batch_size=8",
                  "train.steps=1", "train.tensorboard=false", "checkpoint.async_save=false",
                  "data.seq_len=32", "mesh.ici={fsdp: 2, data: -1}", "optim.warmup_steps=0",
                  "optim.lr=0.01"])
    convert.main(["--to-hf", run, "--out", str(tmp_path / "step0"), "--no-progress"])
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "step0")).eval()
    _close(_torch_logits(back, PROMPTS[600]), _torch_logits(ref, PROMPTS[600]))
    cfg = load_config(os.path.join(run, "config.yaml"))
    final = train(cfg, progress=False)  # resumes step 0, trains step 1, saves it
    assert final["status"] == "done" and np.isfinite(final["loss"])
    convert.to_hf(run, str(tmp_path / "step1"), progress=False)
    moved = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "step1")).eval()
    assert not np.allclose(_torch_logits(moved, PROMPTS[7]), _torch_logits(ref, PROMPTS[7]))


@pytest.mark.slow
def test_rope_scaling_section_and_interleaved_layout_export(tmp_path):
    """``model.rope_scaling`` is a section (a bare number is refused, naming the keys); a typo
    fails; a model with interleaved RoPE exports (q/k permuted) to a rotate-half HF model with
    equal logits."""
    from longctx.config import load_config

    s = load_config(None, ["model.rope_scaling={type: linear, factor: 4}"]).model.rope_scaling
    assert (s.type, s.factor) == ("linear", 4.0)
    with pytest.raises(ConfigError, match=r"model.rope_scaling=4: expected a mapping .*factor"):
        load_config(None, ["model.rope_scaling=4"])
    with pytest.raises(ConfigError, match="model.rope_scaling.type='ntk_by_parts'"):
        load_config(None, ["model.rope_scaling.type=ntk_by_parts"])
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        load_config(None, ["model.rope_scaling.type=yarn"])
    m = load_config(None, ["model.vocab_size=128", "model.d_model=32", "model.n_layers=1",
                           "model.rope_layout=interleaved", "model.attention.qk_norm=true",
                           "model.init_std=0.2", "model.tie_embeddings=false",
                           "model.rope_scaling={type: yarn, factor: 4, "
                           "original_max_position_embeddings: 64}"]).model
    model = build_model(m, rngs=nnx.Rngs(0))
    params = layout.params_of(model)  # per layer, whatever model.scan_layers
    for blk in params["blocks"].values():  # non-trivial q/k norm scales: permutation tested
        blk["mixer"]["q_norm"]["scale"] = jax.random.uniform(jax.random.key(1), (8,)) + 0.5
    layout.set_params(model, params)
    out = hf.save(model, m, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "Qwen3ForCausalLM"
    _close(_torch_logits(back, PROMPTS[600]), np.asarray(model(PROMPTS[600])[0]))
