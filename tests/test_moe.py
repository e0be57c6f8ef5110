"""The MoE feed-forward layer: every dispatch path = a per-expert loop (outputs and
gradients), capacity drops, losses, causality in the LM, expert parallelism over
8 simulated devices = one device, auxiliary-loss-free balancing, upcycling."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import longctx
from longctx.config import ConfigError, MoEConfig
from longctx.inherit.core import upcycle
from longctx.model import layout
from longctx.moe import ops as moe
from longctx.moe.layer import MoE
from longctx.layers import SwiGLU
from longctx.parallel import sharding as shd
from longctx.train import make_optimizer, make_train_step

TINY = "experiments/configs/tiny.yaml"


def _lm(*overrides, seed=0):
    cfg = longctx.load_config(TINY, ["model.moe.num_experts=4", *overrides])
    return longctx.build_model(cfg.model, rngs=nnx.Rngs(seed)), cfg


# Test data from numpy: an eager jax.random call compiles a kernel per new shape.
def _normal(shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _tokens(B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, T)), jnp.int32)


def loop_oracle(x, experts, weights, w_gate, w_up, w_down, keep=None):
    """The oracle: a Python loop over experts and slots. ``x [N, D]``, ``experts [N, k]``."""
    keep = jnp.ones(experts.shape, bool) if keep is None else keep
    y = jnp.zeros_like(x)
    for e in range(w_gate.shape[0]):
        h = (jax.nn.silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]  # expert e on every token
        for j in range(experts.shape[1]):
            y = y + jnp.where((experts[:, j] == e) & keep[:, j], weights[:, j], 0.0)[:, None] * h
    return y


def _problem(G=2, S=24, D=16, F=32, E=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    experts = jnp.asarray(np.argsort(rng.normal(size=(G, S, E)), -1)[..., :k], jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (G, S, k)), jnp.float32)
    w = tuple(jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
              for s in [(E, D, F), (E, D, F), (E, F, D)])
    return x, experts, weights, w


# -- 1. every dispatch path = the per-expert loop, outputs and gradients ----------------------

PATHS = {
    "capacity": lambda x, e, wt, *w: moe.capacity_moe(x, e, wt, *w, capacity=x.shape[1])[0],
    "dropless-blocks": lambda x, e, wt, *w: _flat(moe.dropless_moe, x, e, wt, *w,
                                                   impl="blocks", block_size=8),  # padded blocks
    "dropless-ragged_dot": lambda x, e, wt, *w: _flat(moe.dropless_moe, x, e, wt, *w,
                                                       impl="ragged_dot"),
    "reference": lambda x, e, wt, *w: _flat(moe.moe_reference, x, e, wt, *w),
}


def _flat(fn, x, e, wt, *w, **kw):
    G, S, D = x.shape
    return fn(x.reshape(G * S, D), e.reshape(G * S, -1), wt.reshape(G * S, -1), *w,
              **kw).reshape(G, S, D)


def _output_and_grads(f, problem=None):
    """``f(x, weights, w_gate, w_up, w_down)`` on a test problem -> (y, grads wrt all five)."""
    x, _, weights, w = problem or _problem()
    proj = _normal(x.shape, 9)  # a random cotangent

    def run(*args):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(proj)

    return jax.jit(run)(x, weights, *w)


def _oracle(experts):
    def oracle(x, weights, *w):
        G, S, D = x.shape
        return loop_oracle(x.reshape(-1, D), experts.reshape(G * S, -1),
                           weights.reshape(G * S, -1), *w).reshape(x.shape)
    return oracle


@functools.cache
def _oracle_output_and_grads():
    return _output_and_grads(_oracle(_problem()[1]))


@pytest.mark.parametrize("path", list(PATHS))
def test_every_dispatch_path_equals_the_per_expert_loop(path):
    _, experts, _, _ = _problem()
    got_y, got = _output_and_grads(lambda x, wt, *w: PATHS[path](x, experts, wt, *w))
    want_y, want = _oracle_output_and_grads()
    np.testing.assert_allclose(got_y, want_y, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(["x", "weights", "w_gate", "w_up", "w_down"], got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5, err_msg=name)


def _layer(**kw):
    base = dict(num_experts=4, num_experts_per_tok=2, load_balance_loss_weight=1.0)
    return MoE(16, MoEConfig(**{**base, **kw}), mlp_dim=32, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_dropless_equals_capacity_with_unbounded_capacity_and_shared_experts_add():
    x = _normal((3, 20, 16), 1)
    call = nnx.jit(lambda m, x: m(x))
    y_dl, aux_dl = call(_layer(), x)
    y_cap, aux_cap = call(_layer(capacity_factor=100.0), x)
    np.testing.assert_allclose(y_cap, y_dl, atol=1e-5)
    assert float(aux_cap["moe_dropped_frac"]) == 0.0
    for k in aux_dl:
        np.testing.assert_allclose(aux_cap[k], aux_dl[k], atol=1e-6, err_msg=k)
    # Fine-grained experts (width 8, not mlp_dim) plus a shared expert: routed + dense SwiGLU.
    layer = _layer(shared_experts=2, expert_dim=8)
    assert layer.w_gate.shape == (4, 16, 8) and layer.shared.w_gate.shape == (16, 16)

    @nnx.jit
    def got_and_want(layer, x):
        r = moe.route(jnp.einsum("bsd,de->bse", x, layer.router[...]), k=2)
        routed = loop_oracle(x.reshape(-1, 16), r.experts.reshape(-1, 2),
                             r.weights.reshape(-1, 2), layer.w_gate[...], layer.w_up[...],
                             layer.w_down[...])
        return layer(x)[0], routed.reshape(x.shape) + layer.shared(x)

    np.testing.assert_allclose(*got_and_want(layer, x), atol=1e-5)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_one_expert_with_k1_equals_a_dense_swiglu(dispatch):
    layer = _layer(num_experts=1, num_experts_per_tok=1,
                   capacity_factor=1.0 if dispatch == "capacity" else 0.0)
    dense = SwiGLU(16, 32, rngs=nnx.Rngs(1))
    dense.w_gate[...], dense.w_up[...] = layer.w_gate[0], layer.w_up[0]
    dense.w_down[...] = layer.w_down[0]
    x = _normal((2, 12, 16), 2)
    y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y, dense(x), atol=1e-5)  # softmax over one expert: weight 1
    assert float(aux["moe_dropped_frac"]) == 0.0 and float(aux["moe_load_max"]) == 1.0


# -- 2. losses ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_uniform_routing_gives_a_load_balance_loss_of_k():
    layer = _layer(num_experts_per_tok=2)  # load_balance_loss_weight=1
    layer.router[...] = jnp.zeros_like(layer.router[...])  # every expert probability 1/E
    _, aux = nnx.jit(lambda m, x: m(x))(layer, _normal((2, 8, 16), 3))
    np.testing.assert_allclose(aux["moe_lb_loss"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(aux["moe_z_loss"], 0.0)  # weight 0 by default
    for router in moe.ROUTERS:
        for k in (1, 3, 6):  # E * sum_i f_i / E = sum_i f_i = k
            r = moe.route(jnp.zeros((10, 6)), k=k, router=router)
            np.testing.assert_allclose(moe.load_balance_loss(r.probs, r.experts), k, rtol=1e-6)


@pytest.mark.slow
def test_losses_match_their_closed_forms():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 6)).astype(np.float32)
    r = moe.route(jnp.asarray(logits), k=2)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen = np.argsort(-probs, -1, kind="stable")[:, :2]
    f = np.stack([(chosen == e).any(-1).mean() for e in range(6)])  # sums to k
    np.testing.assert_allclose(moe.load_balance_loss(r.probs, r.experts),
                               6 * np.sum(f * probs.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(moe.router_z_loss(jnp.asarray(logits)), np.mean(lse ** 2),
                               rtol=1e-5)


# -- 3. routers -------------------------------------------------------------------------------


@pytest.mark.slow
def test_routers():
    logits = _normal((5, 8), 4)
    p = jax.nn.softmax(logits)
    a = moe.route(logits, k=3)  # softmax then top-k: the weights are the probabilities
    np.testing.assert_array_equal(a.experts, jax.lax.top_k(p, 3)[1])
    np.testing.assert_allclose(a.weights, jax.lax.top_k(p, 3)[0], rtol=1e-6)
    b = moe.route(logits, k=3, router="topk_softmax")  # same experts, softmax over the k
    np.testing.assert_array_equal(b.experts, a.experts)
    np.testing.assert_allclose(b.weights, a.weights / a.weights.sum(-1, keepdims=True), rtol=1e-5)
    c = moe.route(logits, k=3, router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    np.testing.assert_allclose(c.weights.sum(-1), 2.5, rtol=1e-6)
    # The bias changes the selection only; the weights stay the unbiased scores.
    bias = jnp.zeros(8).at[7].set(10.0)
    d = moe.route(logits, k=3, router="sigmoid", bias=bias)
    assert (d.experts == 7).any(-1).all()
    np.testing.assert_allclose(d.weights, jnp.take_along_axis(jax.nn.sigmoid(logits),
                                                              d.experts, -1), rtol=1e-6)
    # Group-limited: 4 groups of 2, each token keeps its 2 best groups.
    g = moe.route(logits, k=3, n_groups=4, topk_groups=2)
    best_groups = jax.lax.top_k(p.reshape(5, 4, 2).max(-1), 2)[1]
    assert (g.experts[:, :, None] // 2 == best_groups[:, None, :]).any(-1).all()


def test_jitter_only_in_training_mode():
    layer = _layer(jitter_noise=0.5)
    x = _normal((2, 16, 16), 5)
    call = nnx.jit(lambda m, x: m(x)[0])
    np.testing.assert_array_equal(call(layer, x), call(layer, x))  # deterministic by default
    layer.train()
    assert not np.allclose(call(layer, x), call(layer, x))  # fresh noise each call


# -- 4. capacity drops later tokens ------------------------------------------------------------


@pytest.mark.slow
def test_capacity_drops_the_later_tokens():
    assert moe.expert_capacity(4, 2, 3, 0.75) == 2  # ceil(0.75 * 4 * 2 / 3)
    assert moe.expert_capacity(10, 2, 4, 1.25) == 7 and moe.expert_capacity(10, 2, 4, 0) == 10
    assert moe.expert_capacity(10, 2, 4, 100.0) == 10  # never more than the group
    # One sequence, 4 tokens, 3 experts, k=2, capacity 2. Slots claimed in order
    # (position, slot): t0 -> e0, e1; t1 -> e0, e2; t2 -> e0 (full: dropped), e1;
    # t3 -> e1 (full: dropped), e0 (dropped). A slot-major order (every first choice
    # before any second choice) would keep t3 -> e1 at the expense of t2's second
    # choice, i.e. a later token would evict an earlier one.
    experts = jnp.asarray([[[0, 1], [0, 2], [0, 1], [1, 0]]], jnp.int32)
    weights = jnp.asarray([[[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2]]])
    x, _, _, w = _problem(G=1, S=4, D=8, F=16, E=3, k=2, seed=3)

    @jax.jit
    def run(x, *w):
        dispatch, combine, keep = moe.capacity_tensors(experts, weights, 3, 2)
        y, _ = moe.capacity_moe(x, experts, weights, *w, capacity=2)
        return dispatch, combine, keep, y, loop_oracle(x[0], experts[0], weights[0], *w,
                                                       keep=keep[0])

    dispatch, combine, keep, y, want = run(x, *w)
    np.testing.assert_array_equal(keep[0], [[1, 1], [1, 1], [0, 1], [0, 0]])
    assert dispatch[0, 1, 2, 0] == 1 and dispatch[0, 2, 1, 1] == 1 and dispatch[0, 3].sum() == 0
    np.testing.assert_allclose(combine[0, 2, 1, 1], 0.5)
    np.testing.assert_allclose(y[0], want, atol=1e-5)
    np.testing.assert_array_equal(y[0, 3], 0.0)  # fully dropped: only the residual remains


# -- 5. causality in the LM ---------------------------------------------------------------------

CAUSAL = {
    "softmax_topk-dropless": ["model.moe.router=softmax_topk"],
    "softmax_topk-capacity": ["model.moe.router=softmax_topk", "model.moe.capacity_factor=0.5"],
    "topk_softmax-dropless": ["model.moe.router=topk_softmax",
                              "model.moe.dropless_impl=ragged_dot"],
    "topk_softmax-capacity": ["model.moe.router=topk_softmax", "model.moe.capacity_factor=0.5"],
    "sigmoid-dropless": ["model.moe.router=sigmoid", "model.moe.routed_bias_update_rate=0.01",
                         "model.moe.n_groups=2", "model.moe.shared_experts=1"],
    "sigmoid-capacity-segments": ["model.moe.router=sigmoid", "model.moe.capacity_factor=0.5",
                                  "model.moe.norm_topk_prob=true", "model.segment_len=16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CAUSAL))
def test_no_logit_depends_on_a_later_token(name):
    model, cfg = _lm(*CAUSAL[name])
    T, t = 50, 29
    tok = _tokens(2, T, 1)
    changed = tok.at[0, t].set((tok[0, t] + 7) % 256)
    f = nnx.jit(lambda m, tok: m(tok))
    (a, aux), (b, _) = f(model, tok), f(model, changed)
    if cfg.model.moe.capacity_factor > 0:
        assert float(aux["moe_dropped_frac"]) > 0.05  # capacity binds: drops do happen
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)  # the past, every row
    np.testing.assert_allclose(a[1], b[1], atol=1e-6, rtol=0)  # capacity is per sequence
    assert not np.allclose(a[0, t:], b[0, t:])


@pytest.mark.slow
def test_expert_choice_is_refused_unless_its_leak_is_acknowledged():
    with pytest.raises(ConfigError, match="leaks the future"):
        _lm("model.moe.expert_choice=true", "model.moe.capacity_factor=1.0")
    model, _ = _lm("model.moe.expert_choice=true", "model.moe.capacity_factor=1.0",
                   "model.moe.acknowledge_expert_choice_leaks=true")
    tok = _tokens(2, 50, 1)
    f = nnx.jit(lambda m, tok: m(tok)[0])
    a, b = f(model, tok), f(model, tok.at[0, 40].set((tok[0, 40] + 7) % 256))
    assert not np.allclose(a[0, :40], b[0, :40], atol=1e-6)  # and it does leak


# -- 6. expert parallelism = one device ----------------------------------------------------------


@pytest.mark.slow
def test_expert_parallel_dispatch_on_8_devices_equals_the_per_expert_loop():
    problem = _problem(G=8, S=12, seed=5)  # 8 sequences: one per device; 4 experts: 1 per device
    experts = problem[1]
    mesh = shd.make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(mesh):  # dropless: capacity = the whole sequence, nothing dropped
        got_y, got = _output_and_grads(lambda x, wt, *w: moe.expert_parallel_moe(
            x, experts, wt, *w, capacity_factor=0.0)[0], problem)
    want_y, want = _output_and_grads(_oracle(experts), problem)
    np.testing.assert_allclose(got_y, want_y, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(["x", "weights", "w_gate", "w_up", "w_down"], got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_expert_parallel_layer_on_8_devices_equals_one_device():
    # Capacity dispatch with drops: per-sequence capacity makes the drops identical too.
    layer = _layer(expert_parallel=True, capacity_factor=1.0, router_z_loss_weight=1.0)
    x, proj = _normal((8, 12, 16), 6), _normal((8, 12, 16), 7)

    def grads(layer, x):
        def loss(layer, x):
            y, aux = layer(x)
            return jnp.sum(y * proj) + aux["moe_lb_loss"] + aux["moe_z_loss"], aux
        return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

    (_, ref_aux), (ref_gw, ref_gx) = nnx.jit(grads)(layer, x)

    mesh = shd.make_mesh({"data": 2, "expert": 4})
    graphdef, state = nnx.split(layer)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, shd.state_shardings(state, mesh, shd.DEFAULT_RULES))
        assert state["w_gate"][...].sharding.spec == P("expert", None, None)  # 1 expert/device
        x = jax.device_put(x, shd.batch_sharding(mesh, shd.DEFAULT_RULES, 3))
        step = jax.jit(lambda s, x: grads(nnx.merge(graphdef, s), x)).lower(state, x).compile()
        assert "all-to-all" in step.as_text()  # the expert-parallel path ran
        (_, aux), (gw, gx) = step(state, x)
    assert float(aux["moe_dropped_frac"]) > 0
    for k in ref_aux:
        np.testing.assert_allclose(aux[k], ref_aux[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-6, rtol=1e-4)
    flat = dict(nnx.to_flat_state(gw))
    for path, v in nnx.to_flat_state(ref_gw):
        np.testing.assert_allclose(flat[path][...], v[...], atol=1e-6, rtol=1e-4,
                                   err_msg="/".join(map(str, path)))


# -- 7. auxiliary-loss-free balancing --------------------------------------------------------------


@pytest.mark.slow
def test_router_bias_update_moves_the_load_toward_balance():
    model, cfg = _lm("model.n_layers=1", "model.moe.router=sigmoid",
                     "model.moe.routed_bias_update_rate=0.05",
                     "model.moe.load_balance_loss_weight=0", "optim.lr=1e-6")
    # Skew every router toward experts 0 and 1: a direction shared by all embeddings
    # that the routers read as a positive logit for those experts, on top of random
    # router weights that spread the tokens.
    model.embed.embedding[...] = model.embed.embedding[...].at[:, 0].set(0.1)
    params = layout.params_of(model)  # per-layer view, whatever model.scan_layers
    for i, block in params["blocks"].items():
        w = _normal(block["mlp"]["router"].shape, i, scale=0.1)
        block["mlp"]["router"] = w.at[0].set(jnp.asarray([0.3, 0.15, 0, 0]))
    layout.set_params(model, params)
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, 100), wrt=nnx.Param)
    assert not any("bias" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(opt.opt_state))[0])
    graphdef, state = nnx.split((model, opt))
    step = jax.jit(make_train_step(graphdef, 1))
    tok = _tokens(16, 32, 3)
    batch = {"tokens": tok, "targets": jnp.roll(tok, -1, 1), "loss_mask": jnp.ones((16, 32))}
    ratios = []  # max / mean expert load, measured in the forward pass of each step
    for _ in range(8):
        state, metrics = step(state, batch)
        ratios.append(float(metrics["moe_load_max"] / metrics["moe_load_mean"]))
    assert ratios[0] > 1.5, ratios  # skewed: 2 would be every token on experts 0 and 1
    assert max(ratios[-3:]) < 0.8 * ratios[0], ratios
    trained = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0]))
    bias = layout.to_per_layer(cfg.model, trained)["blocks"][0]["mlp"]["bias"]
    assert bias[0] < 0 < bias.max()  # the most loaded expert went down, an underloaded one up


# -- 8. placement, config, upcycling -----------------------------------------------------------


def test_placement_and_config_errors():
    model, cfg = _lm("model.n_layers=6", "model.moe.every=2", "model.moe.first_dense_layers=1")
    assert cfg.model.moe.layers(cfg.model.n_layers) == [2, 4]
    blocks = layout.blocks_of(model)
    assert [isinstance(b.mlp, MoE) for b in blocks] == [0, 0, 1, 0, 1, 0]
    assert layout.stages(cfg.model)[1] == layout.Stage(1, 2, 2, True)  # layers 1-4 stacked
    assert blocks[2].mlp.w_down.get_metadata()["out_sharding"] == ("layers", "expert", "mlp",
                                                                   "embed")
    for bad, msg in [("model.moe.dispatch=capacity", "needs capacity_factor"),
                     ("model.moe.router=top1", "expected one of"),
                     ("model.moe.n_groups=3", "must divide"),
                     ("model.moe.first_dense_layers=2", "leave no MoE layer")]:
        with pytest.raises(ConfigError, match=msg):
            _lm(bad)
    assert longctx.load_config(TINY).model.moe.num_experts == 0  # dense by default


@pytest.mark.slow
def test_upcycled_model_computes_the_dense_function():
    dense_cfg = longctx.load_config(TINY, ["model.n_layers=1"]).model
    dense = longctx.build_model(dense_cfg, rngs=nnx.Rngs(0))
    moe_cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(num_experts=4,
                                                           router="topk_softmax"))
    up = upcycle(dense, moe_cfg, rngs=nnx.Rngs(1))
    tok = _tokens(2, 32, 4)
    call = nnx.jit(lambda m, tok: m(tok)[0])
    want, got = call(dense, tok), call(up, tok)
    np.testing.assert_allclose(got, want, atol=1e-5)  # weights sum to 1, experts identical
    w = layout.params_of(up)["blocks"][0]["mlp"]["w_up"]
    np.testing.assert_array_equal(w[3], layout.params_of(dense)["blocks"][0]["mlp"]["w_up"])
    noisy = upcycle(dense, moe_cfg, rngs=nnx.Rngs(1), noise_std=0.1)
    w = layout.params_of(noisy)["blocks"][0]["mlp"]["w_up"]
    assert not np.allclose(w[0], w[1]) and np.allclose(w[0], w[1], atol=0.05)
    with pytest.raises(ValueError, match="shape"):
        upcycle(dense, dataclasses.replace(moe_cfg, moe=MoEConfig(num_experts=4,
                                                                      expert_dim=64)),
                    rngs=nnx.Rngs(1))
