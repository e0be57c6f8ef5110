"""Training metrics: active parameters (k of E experts, no embeddings) and the FLOPs behind
MFU (6 N tokens + the mixers' own mixing FLOPs, against a hand count)."""

import numpy as np
import pytest

from longctx.config import load_config
from longctx.train import train

TINY = "experiments/configs/tiny.yaml"


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


@pytest.mark.slow
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
