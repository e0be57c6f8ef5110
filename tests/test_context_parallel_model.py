"""Context parallelism in the model and trainer: one train step on mesh (data 2, sequence 4)
equals the same step on one device, for `full` (zigzag ring), `linear` (state passing) and a
hybrid (contiguous ring + state passing, short convs across device boundaries)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.config import load_config
from longctx.data.pipeline import build_source, make_dataset
from longctx.model import layout
from longctx.parallel import context
from longctx.parallel import sharding as shd
from longctx.train.step import loss_fn

SMALL = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_dim=64",
         "model.n_layers=2", "data.seq_len=64"]


def _grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, batch):
        (loss, _), g = jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch), has_aux=True)(params)
        return loss, g

    return f, params


@pytest.mark.slow
@pytest.mark.parametrize("extra,collective", [
    (("model.attention.conv_size=0", "model.attention.context_parallel=ring",
      "model.n_layers=1"),
     "collective-permute"),  # every layer full: zigzag order, ring
    (("model.attention.backend=linear", "model.attention.linear.variant=rwkv7",
      "model.attention.linear.chunk_size=8", "model.n_layers=1"),
     "all-gather"),  # RWKV-7: state passing, the token shift across device boundaries
    (("model.attention.pattern=[linear, full]", "model.attention.context_parallel=all_gather",
      "model.attention.linear.variant=gla", "model.attention.linear.chunk_size=8"),
     "all-gather"),  # hybrid: contiguous split, short convs across device boundaries
], ids=["full-zigzag-ring", "rwkv7", "linear-full-all_gather"])
def test_sequence_sharded_train_step_equals_single_device(extra, collective):
    """Loss and every parameter gradient of a train step on mesh (data 2, sequence 4)."""
    cfg = load_config("experiments/configs/tiny.yaml", [*SMALL, *extra])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    source = build_source("synthetic", seq_len=64, vocab_size=256, task="mqar", seed=0,
                          num_kv_pairs=4)
    batch = next(iter(make_dataset(source, global_batch_size=4, seed=0)))
    batch = {k: jnp.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask")}
    f, params = _grads(model, batch)
    loss_ref, g_ref = jax.jit(f)(params, batch)

    mesh = shd.make_mesh({"data": 2, "sequence": 4})
    rules = shd.DEFAULT_RULES
    with jax.set_mesh(mesh), shd.activation_rules(mesh, rules):
        sharded = {k: jax.device_put(v, shd.batch_sharding(mesh, rules)) for k, v in batch.items()}
        compiled = jax.jit(f).lower(params, sharded).compile()
        loss, g = compiled(params, sharded)
    assert collective in compiled.as_text()  # the context-parallel path ran, not GSPMD's
    assert abs(float(loss) - float(loss_ref)) < 1e-5
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g_ref)[0]]
    for k, a, b in zip(paths, jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4, err_msg=k)


def test_model_permutes_only_when_every_layer_takes_zigzag():
    def layouts(*extra):
        cfg = load_config(None, [*SMALL, *extra])
        model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
        return {b.mixer.token_layout for b in layout.blocks_of(model)}

    assert layouts("model.attention.conv_size=0") == {"zigzag"}
    assert layouts("model.attention.conv_size=4") == {"natural"}  # a conv needs natural order
    assert layouts("model.attention.pattern=[linear, full]") == {"natural"}
    assert layouts("model.attention.cp_load_balance=false") == {"natural"}


def test_recurrent_refuses_a_split_sequence():
    cfg = load_config(None, [*SMALL, "model.attention.backend=recurrent", "model.segment_len=16"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((2, 4), ("data", "sequence"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="segment_len"):
        model(jnp.zeros((2, 64), jnp.int32))


def test_context_parallel_key_is_validated():
    with pytest.raises(longctx.config.ConfigError, match="context_parallel='tree'"):
        load_config(None, ["model.attention.context_parallel=tree"])
    assert context.active_strategy("auto") is None  # no mesh: nothing is split


def test_gspmd_only_paths_are_logged_once(caplog):
    mesh = jax.make_mesh((2, 4), ("data", "sequence"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    context._NOTED.clear()
    with caplog.at_level("WARNING", logger="longctx.parallel.context"):
        context.note_gspmd("full attention", "it attends from a KV cache")  # no mesh: silent
        with jax.set_mesh(mesh):
            for _ in range(3):
                context.note_gspmd("full attention", "it attends from a KV cache")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "splits the sequence 4 ways" in msgs[0] and "GSPMD" in msgs[0]
