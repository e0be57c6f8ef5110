"""The first trainer: schedule, decay mask, a short run that learns, run-dir outputs, CLI errors."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from longctx.config import OptimConfig, load_config
from longctx.train import train
from longctx.train.optimizer import decay_mask, lr_schedule

TINY = "experiments/configs/tiny.yaml"


def test_warmup_then_cosine_closed_form():
    o = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    s = lr_schedule(o, total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    # cosine: lr * (alpha + (1 - alpha) * (1 + cos(pi * t / T)) / 2)
    t = 50 / 100
    np.testing.assert_allclose(float(s(60)), 1e-3 * (0.1 + 0.9 * (1 + np.cos(np.pi * t)) / 2),
                               rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)


def test_linear_and_constant_schedules():
    lin = lr_schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100)
    np.testing.assert_allclose([float(lin(0)), float(lin(50)), float(lin(100))], [1, 0.5, 0], atol=1e-6)
    const = lr_schedule(OptimConfig(lr=0.5, warmup_steps=0, schedule="constant"), 100)
    assert float(const(99)) == 0.5


def test_weight_decay_skips_norms_and_vectors():
    params = {"w": jnp.zeros((3, 4)), "norm": {"scale": jnp.ones((4,))}, "emb": jnp.zeros((5, 4))}
    assert decay_mask(params) == {"w": True, "norm": {"scale": False}, "emb": True}


def test_short_run_learns_and_writes_the_run_dir(tmp_path):
    cfg = load_config(TINY, [f"train.run_dir={tmp_path}", "train.steps=60", "train.batch_size=16",
                             "train.log_every=10", "train.eval_every=0", "train.eval_batches=1",
                             "optim.warmup_steps=10", "data.task=copy", "data.seq_len=32"])
    final = train(cfg, progress=False)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3  # the loss goes down
    for key in ("accuracy", "grad_norm", "lr", "tokens_per_s", "step_time_s"):
        assert np.isfinite(train_rows[-1][key]), key
    assert "eval_accuracy" in final and 0.0 <= final["eval_accuracy"] <= 1.0
    saved = yaml.safe_load(open(tmp_path / "config.yaml"))
    assert saved["train"]["steps"] == 60 and saved["data"]["task"] == "copy"


def test_cli_reports_config_errors():
    r = subprocess.run([sys.executable, "-m", "longctx.train", "--config", TINY,
                        "model.n_kv_heads=3"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode != 0
    assert "model.n_heads=4 must be divisible by model.n_kv_heads=3" in r.stderr


@pytest.mark.parametrize("missing", ["no_such.yaml"])
def test_cli_missing_config(missing):
    r = subprocess.run([sys.executable, "-m", "longctx.train", "--config", missing],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "config file not found" in r.stderr


def test_active_params_count_k_of_e_experts_and_no_embeddings():
    from flax import nnx

    import longctx
    from longctx.train.metrics import active_params

    dense = load_config(TINY)
    m = longctx.build_model(dense.model, rngs=nnx.Rngs(0))
    total, active = active_params(dense.model, nnx.state(m, nnx.Param))
    assert total - active == 256 * 128  # the tied embedding only
    moe = load_config(TINY, ["model.moe.num_experts=8", "model.moe.num_experts_per_tok=2",
                             "model.moe.expert_dim=64"])
    mm = longctx.build_model(moe.model, rngs=nnx.Rngs(0))
    total_m, active_m = active_params(moe.model, nnx.state(mm, nnx.Param))
    experts = 2 * 8 * 3 * 128 * 64  # 2 MoE layers x E x (gate, up, down) x d_model x expert_dim
    assert total_m > active_m
    # 6/8 of the expert weights are inactive per token (up to the tiny load probe).
    assert abs((total_m - 256 * 128 - active_m) - experts * 6 // 8) <= 2 * 8


# -- segment-scanned models: the loss window by window -------------------------------------


def _segment_case(*overrides, T=40, B=2):
    import jax
    from flax import nnx

    import longctx

    cfg = load_config("experiments/configs/tiny.yaml", list(overrides))
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
    batch = {"tokens": tok, "targets": jnp.roll(tok, -1, 1),
             "loss_mask": jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32),
             "segment_ids": jnp.asarray(np.repeat([[1] * 17 + [2] * (T - 17)], B, 0))}
    return jax, nnx, model, batch


@pytest.mark.parametrize("overrides", [
    ("model.attention.backend=recurrent", "model.segment_len=8", "model.bptt_segments=2",
     "model.attention.recurrent.num_memory_tokens=2", "model.attention.recurrent.compressive=delta"),
    ("model.attention.backend=recurrent", "model.segment_len=8", "model.bptt_segments=0"),
    ("model.attention.backend=linear", "model.segment_len=16", "model.bptt_segments=1"),
    # hybrids: each layer carries its own kind of state through the windows
    ("model.attention.pattern=[linear, full]", "model.segment_len=8", "model.bptt_segments=2"),
    ("model.attention.pattern=[recurrent, linear]", "model.segment_len=8",
     "model.bptt_segments=2", "model.attention.recurrent.compressive=linear"),
])
def test_segment_windows_equal_the_model_forward(overrides):
    """Loss, accuracy and every gradient of the windowed path (T=40: the last segment and
    the last window padded) equal loss_fn on model(tokens) with the same BPTT cut."""
    from longctx.train import loss_fn, segment_value_and_grad

    jax, nnx, model, batch = _segment_case(*overrides)
    denom = batch["loss_mask"].sum()
    graphdef, state = nnx.split(model)
    (l_ref, m_ref), g_ref = jax.jit(lambda s, b: nnx.value_and_grad(  # jitted: eager is slower
        lambda m: loss_fn(m, b, denom), has_aux=True)(nnx.merge(graphdef, s)))(state, batch)
    (l_seg, m_seg), g_seg = jax.jit(
        lambda s, b: segment_value_and_grad(graphdef, s, b, denom))(state, batch)
    np.testing.assert_allclose(l_seg, l_ref, rtol=1e-5)
    np.testing.assert_allclose(m_seg["accuracy"], m_ref["accuracy"], rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_ref), nnx.to_flat_state(g_seg)):
        np.testing.assert_allclose(b[...], a[...], atol=2e-6, err_msg=str(path))


def test_segment_windows_memory_does_not_grow_with_length():
    """Compiled scratch of a train step's gradients at 8x the length: within 1.3x."""
    from longctx.train import segment_value_and_grad

    def scratch(T):
        jax, nnx, model, batch = _segment_case(
            "model.attention.backend=recurrent", "model.segment_len=32", "model.bptt_segments=2",
            "model.attention.recurrent.num_memory_tokens=2", T=T, B=1)
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, b: segment_value_and_grad(graphdef, s, b, jnp.asarray(1.0)))
        return f.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    small, large = scratch(512), scratch(4096)
    assert large <= 1.3 * small, (small, large)


@pytest.mark.parametrize("case", ["linear", "recurrent"])
def test_mfu_counts_the_mixing_flops_of_every_backend(tmp_path, case):
    """The trainer's FLOPs per step = 6 N tokens + 3 x a hand count of the mixing FLOPs
    (tiny model: 2 layers, 4 heads of 32, 2 kv heads; B=8 (one row per device), T=64)."""
    import jax
    from flax import nnx

    import longctx

    overrides = {
        # chunk form, C=16, K=V=32: per token and head 2C(K+V) + 4KV = 2048 + 4096 = 6144;
        # x 8*64 tokens x 4 heads x 2 layers = 25,165,824 forward.
        "linear": (["model.attention.backend=linear", "model.attention.linear.variant=linear",
                    "model.attention.linear.chunk_size=16"], 25_165_824),
        # 4 segments of 16, XL cache of 1 segment: visible pairs 136 + 3 * (16*16 + 136) =
        # 1312, x 4 H D = 671,744; delta compressive memory per token H (2D^2 + 2D) + K 4D^2
        # = 8448 + 8192 = 16,640, x 64 = 1,064,960; (671,744 + 1,064,960) x B 8 x 2 layers.
        "recurrent": (["model.attention.backend=recurrent", "model.segment_len=16",
                       "model.attention.recurrent.cache_segments=1",
                       "model.attention.recurrent.compressive=delta"], 27_787_264),
    }[case]
    cfg = load_config("experiments/configs/tiny.yaml", [
        *overrides[0], f"train.run_dir={tmp_path}", "train.steps=1", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=0", "train.tensorboard=false",
        "checkpoint.async_save=false"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    n = sum(v[...].size for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if path[0] != "embed")  # tied embeddings are not counted (6 N tokens rule)
    expected = 6 * n * 8 * 64 + 3 * overrides[1]
    row = train(cfg, progress=False)
    logged = row["tflops_per_s"] * 1e12 * row["step_time_s"]
    np.testing.assert_allclose(logged, expected, rtol=1e-9)
    assert row["mfu"] > 0 and jax.device_count() == 8
