"""``model.scan_layers``: stacked layers (pattern groups) run by ``lax.scan`` compute exactly
what the unrolled layers do, given the same weights through ``longctx.model.layout``:
logits, loss, every gradient, the trainer's windowed path, decoding, the optimizer step
with the MoE router-bias hook, sharded training, checkpoints across the two layouts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import longctx
from longctx.data.pipeline import build_source, make_dataset
from longctx.evals.core import load_model
from longctx.config import ConfigError, ModelConfig, load_config
from longctx.model import build_model, layout
from longctx.inherit.core import upcycle
from longctx.moe.config import MoEConfig
from longctx.train import make_optimizer, make_train_step, train
from longctx.train.checkpoint import convert_layout
from longctx.train.step import loss_fn, segment_value_and_grad

V, T = 64, 16
BASE = dict(vocab_size=V, d_model=32, n_heads=2, n_kv_heads=2, mlp_dim=64, max_seq_len=64,
            scan_layers=True)
MOE = MoEConfig(num_experts=4, num_experts_per_tok=2, first_dense_layers=1,
                routed_bias_update_rate=0.01)


def _model_cfg(**kw):
    attention = kw.pop("attention", {})
    cfg = ModelConfig(**{**BASE, **kw})
    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, **attention))


CASES = {
    "full": _model_cfg(n_layers=3),
    "linear": _model_cfg(n_layers=2, attention=dict(backend="linear")),
    "recurrent-segments": _model_cfg(n_layers=2, segment_len=8, bptt_segments=1,
                                     attention=dict(backend="recurrent")),
    # stages: layer 0 (dense) unrolled, a scan over 2 groups (full+MoE, linear+MoE), layer 5
    # unrolled (the remainder); remat inside the scan body
    "hybrid-moe-remainder": _model_cfg(n_layers=6, moe=MOE, remat="full",
                                       attention=dict(pattern=("linear", "full"))),
}


def _pair(cfg):
    """A scanned model and an unrolled one holding the same weights (via the per-layer view)."""
    scanned = build_model(cfg, rngs=nnx.Rngs(0))
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    unrolled = build_model(ucfg, rngs=nnx.Rngs(1))
    params = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(params, layout.to_per_layer(
        cfg, nnx.to_pure_dict(nnx.state(scanned, nnx.Param))))
    nnx.update(unrolled, params)
    return scanned, unrolled


def _batch(seed=0, B=2):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (B, T + 1), 0, V)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": jnp.ones((B, T), jnp.int32)}


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    logits, _ = model(batch["tokens"])
    (loss, metrics), grads = nnx.value_and_grad(lambda m: loss_fn(m, batch), has_aux=True)(model)
    return logits, loss, metrics, nnx.to_pure_dict(grads)


def _close(a, b, tol, what=""):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_scanned_equals_unrolled_logits_loss_grads(name):
    cfg = CASES[name]
    scanned, unrolled = _pair(cfg)
    batch = _batch()
    ls, loss_s, ms, gs = _value_and_grad(*nnx.split(scanned), batch)
    lu, loss_u, mu, gu = _value_and_grad(*nnx.split(unrolled), batch)
    np.testing.assert_allclose(ls, lu, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(loss_s, loss_u, atol=1e-6, rtol=1e-6)
    _close({k: ms[k] for k in mu}, mu, 1e-6, "metrics")  # MoE aux averaged over the layers
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(gu))
    _close(layout.to_per_layer(cfg, gs), gu, 1e-6, "grad")
    if cfg.segment_len:  # the trainer's windowed path carries the stacked state too
        denom = jnp.float32(batch["loss_mask"].sum())
        (l_s, _), g_s = jax.jit(segment_value_and_grad, static_argnums=0)(
            *nnx.split(scanned), batch, denom)
        (l_u, _), g_u = jax.jit(segment_value_and_grad, static_argnums=0)(
            *nnx.split(unrolled), batch, denom)
        np.testing.assert_allclose(l_s, l_u, atol=1e-6, rtol=1e-6)
        _close(layout.to_per_layer(cfg, nnx.to_pure_dict(g_s)), nnx.to_pure_dict(g_u), 1e-6,
               "windowed grad")


def test_stages_parameters_and_state_are_stacked_per_group():
    cfg = CASES["hybrid-moe-remainder"]
    assert layout.stages(cfg) == [layout.Stage(0, 1, 1, False), layout.Stage(1, 2, 2, True),
                                  layout.Stage(5, 1, 1, False)]
    assert [s.scanned for s in layout.stages(CASES["full"])] == [True]
    model = build_model(cfg, rngs=nnx.Rngs(0))
    w = nnx.state(model, nnx.Param)["stages"][1]["blocks"][0]["mlp"]["w_up"]
    assert w[...].shape == (2, 4, 32, 64)  # [n_groups, experts, embed, mlp]
    assert w.get_metadata()["out_sharding"] == ("layers", "expert", "embed", "mlp")
    per_layer = layout.states_to_per_layer(cfg, model.init_state(2)["layers"])
    assert len(per_layer) == 6 and "S" in per_layer[2] and "k" in per_layer[1]
    back = layout.states_from_per_layer(cfg, per_layer)
    assert jax.tree.structure(back) == jax.tree.structure(model.init_state(2)["layers"])
    with pytest.raises(ConfigError, match="scan_layers"):
        longctx.load_config("experiments/configs/tiny.yaml", ["model.scan_layers=3"])


@pytest.mark.slow
def test_decoding_steps_equal_the_forward_and_the_unrolled_steps():
    cfg = _model_cfg(n_layers=4, attention=dict(pattern=("linear", "full")))
    scanned, unrolled = _pair(cfg)
    tokens = _batch()["tokens"]
    full, _ = scanned(tokens)
    step = jax.jit(lambda gd, st, t, s: nnx.merge(gd, st).step(t, s), static_argnums=0)
    for model in (scanned, unrolled):
        graphdef, st = nnx.split(model)
        state, outs = model.init_state(2), []
        for t in range(T):
            logits, _, state = step(graphdef, st, tokens[:, t:t + 1], state)
            outs.append(logits)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
        if model is scanned:
            final = layout.states_to_per_layer(cfg, state["layers"])
        else:
            _close(final, state["layers"], 1e-5, "state")


@pytest.mark.slow
def test_train_step_with_router_bias_hook_equals_unrolled():
    cfg = CASES["hybrid-moe-remainder"]
    optim = load_config("experiments/configs/tiny.yaml").optim
    out = []
    for model in _pair(cfg):
        opt = nnx.Optimizer(model, make_optimizer(optim, 10), wrt=nnx.Param)
        graphdef, state = nnx.split((model, opt))
        state, metrics = jax.jit(make_train_step(graphdef, 1))(state, _batch(1, B=4))
        out.append((nnx.to_pure_dict(state), metrics))
    (s_scan, m_scan), (s_unr, m_unr) = out
    np.testing.assert_allclose(m_scan["loss"], m_unr["loss"], atol=1e-6)
    bias = s_scan[0]["stages"][1]["blocks"][1]["mlp"]["bias"]  # [n_groups, E], moved per layer
    assert bias.shape == (2, 4) and np.abs(bias).max() > 0
    _close(convert_layout(s_scan, cfg, dataclasses.replace(cfg, scan_layers=False)), s_unr,
           1e-5, "state")


def _trainer_cfg(run_dir, *extra):
    return load_config("experiments/configs/tiny.yaml", [
        f"train.run_dir={run_dir}", "train.batch_size=8", "train.log_every=1",
        "train.eval_every=0", "train.tensorboard=false", "optim.warmup_steps=2",
        "checkpoint.async_save=false", "model.d_model=32", "model.mlp_dim=64",
        "model.n_layers=3", *extra])


@pytest.mark.slow
def test_sharded_scanned_step_equals_single_device(tmp_path):
    cfg = _trainer_cfg(tmp_path, "train.steps=1", "model.scan_layers=true",
                       "mesh.ici={data: 2, fsdp: 2, tensor: 2}")
    final, state = train(cfg, progress=False, return_state=True)
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, cfg.train.steps), wrt=nnx.Param)
    graphdef, ref = nnx.split((model, opt))
    source = build_source("synthetic", seq_len=cfg.data.seq_len, vocab_size=256, task="mqar",
                          seed=cfg.data.seed, num_kv_pairs=4)
    batch = {k: jnp.asarray(v) for k, v in
             next(iter(make_dataset(source, global_batch_size=8, seed=cfg.data.seed))).items()}
    ref, ref_metrics = jax.jit(make_train_step(graphdef, 1))(ref, batch)
    assert abs(final["loss"] - float(ref_metrics["loss"])) < 1e-5
    _close(state, nnx.to_pure_dict(ref), 1e-5, "sharded")
    wq = state[0]["stages"][0]["blocks"][0]["mixer"]["wq"]  # [layers, embed, heads, head_dim]
    assert wq.shape[0] == 3 and wq.sharding.spec == P(None, "fsdp", "tensor", None)


@pytest.mark.slow
def test_checkpoint_unscanned_resumes_scanned_and_back(tmp_path):
    whole, s_whole = train(_trainer_cfg(tmp_path / "whole", "train.steps=4",
                                        "model.scan_layers=false"), progress=False,
                           return_state=True)
    flip = lambda s: dataclasses.replace(s, scan_layers=not s.scan_layers)  # noqa: E731
    unscanned = _trainer_cfg(tmp_path / "run", "train.steps=4", "model.scan_layers=false")
    train(unscanned, progress=False, stop_at_step=2)  # checkpoint at step 2, unrolled layout
    scanned = _trainer_cfg(tmp_path / "run", "train.steps=4", "model.scan_layers=true")
    _, s_scanned = train(scanned, progress=False, return_state=True)  # resumes stacked
    assert "stages" in s_scanned[0]
    _close(convert_layout(s_scanned, scanned.model, unscanned.model), s_whole, 1e-5, "resumed")
    # ... and the stacked checkpoint of step 4 restores into an unrolled model (evals)
    _, model, step = load_model(str(tmp_path / "run"), ["model.scan_layers=false"])
    assert step == 4 and flip(scanned.model) == model.cfg
    _close(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
           {k: v for k, v in s_whole[0].items()}, 1e-5, "evals")


@pytest.mark.slow
def test_upcycle_matches_layers_across_stage_plans():
    dense_cfg = _model_cfg(n_layers=3)  # one scanned stage of 3 layers
    moe_cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(  # layer 0 unrolled, scan of 2
        num_experts=4, router="topk_softmax", first_dense_layers=1))
    dense = build_model(dense_cfg, rngs=nnx.Rngs(0))
    up = upcycle(dense, moe_cfg, rngs=nnx.Rngs(1))
    tokens = _batch()["tokens"]
    np.testing.assert_allclose(up(tokens)[0], dense(tokens)[0], atol=1e-5)
