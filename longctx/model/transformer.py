"""Decoder-only language model: a stack of (mixer, feed-forward) blocks over segments.

    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    logits, aux = model(tokens)          # [B, T] int32 -> [B, T, vocab] float32, dict

Block (pre-norm): ``x += mixer(norm(x)); x += ffn(norm(x))``; then a final norm
and the LM head (tied to the embedding or not). Layer ``i``'s mixer is the backend
``model.attention.pattern[i % len(pattern)]`` (or ``model.attention.backend``),
looked up in :data:`longctx.model.registry.BACKENDS`; its feed-forward is a dense
SwiGLU or the MoE layer (``model.moe``). This driver knows no backend by name: it
builds mixers through the registry, carries whatever state each one returns, and
asks them for their FLOPs and for a wrapper around the stack (memory tokens).

Two ways to run a sequence, chosen by ``model.segment_len``:

* ``0``: one pass over the whole sequence, every mixer stateless.
* ``N``: ``lax.scan`` over N-token segments carrying every layer's state
  (:mod:`longctx.model.segments`: one ``jax.checkpoint`` per segment, the carried
  state cut every ``model.bptt_segments`` segments). A last partial segment is
  padded at the end and its padding dropped; causality keeps the padding
  invisible to real tokens. A stack wrapper (memory tokens) always runs in
  segments.

Decoding is the same mechanism with a segment of one token::

    state = model.init_state(batch_size)
    logits, aux, state = model.step(tokens[:, t:t+1], state)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longctx import targets
from longctx.backends.base import Mixer, MixerDims
from longctx.config import ModelConfig, validate_model
from longctx.layers import DTYPES, Embed, RMSNorm, SwiGLU, param
from longctx.model import layout, segments, stack
from longctx.model.registry import build_mixer, build_stack_wrapper
from longctx.moe.layer import MoE
from longctx.parallel import context
from longctx.parallel.sharding import constrain

# Activations between blocks: batch over the data-parallel axes, length over
# `sequence`, the embedding dimension whole (a no-op outside the trainer's mesh).
ACTIVATION_AXES = ("batch", "length", None)

# model.remat: what a block keeps for the backward pass (its input is always kept: the
# residual stream between blocks). Each is a jax.checkpoint policy around one block.
REMAT_POLICIES = {
    # recompute the whole block in the backward pass: the least memory, ~1/3 more FLOPs
    "full": None,
    # keep the mixer's and the feed-forward's outputs (two [B, T, E] per block, tagged
    # below): the backward recomputes the block's inside but not its two branches
    "minimal": jax.checkpoint_policies.save_only_these_names("mixer_out", "mlp_out"),
    # keep every matmul output without batch dimensions (projections, MLP): recompute
    # only elementwise work and the attention / chunk math
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # as "dots", but the matmul outputs wait in the host's pinned memory, not on the
    # device (TPU / GPU; the transfers overlap the compute where the compiler can)
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        offload_src="device", offload_dst="pinned_host"),
}
# Policies that move data to host memory: the platform compiled for must have it.
OFFLOADING = ("offload_dots",)


def mixer_dims(cfg: ModelConfig) -> MixerDims:
    """The explicit sizes every mixer is built from; the residual init scale computed once."""
    return MixerDims(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     head_dim=cfg.resolved_head_dim, dtype=cfg.dtype, init_std=cfg.init_std,
                     out_std=cfg.init_std / (2 * cfg.n_layers) ** 0.5,
                     rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                     rope_layout=cfg.rope_layout, norm_eps=cfg.norm_eps,
                     max_seq_len=cfg.max_seq_len, segment_len=cfg.segment_len)


class Block(nnx.Module):
    """Pre-norm residual block around a token mixer and a feed-forward (SwiGLU or MoE)."""

    def __init__(self, mixer, mlp, *, d_model: int, eps: float, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(d_model, eps=eps, rngs=rngs)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps=eps, rngs=rngs)
        self.mlp = mlp

    def __call__(self, x, *, positions, state=None, segment_ids=None):
        h, new_state = self.mixer(self.attn_norm(x), positions=positions, state=state,
                                  segment_ids=segment_ids)
        x = x + checkpoint_name(h, "mixer_out").astype(x.dtype)
        aux = {}
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(self.mlp_norm(x))  # aux: MoE losses and load statistics
        else:
            h = self.mlp(self.mlp_norm(x))
        x = x + checkpoint_name(h, "mlp_out").astype(x.dtype)
        return x, new_state, aux


def _apply_block(graphdef, params, x, positions, state, segment_ids):
    block = nnx.merge(graphdef, params)
    return block(x, positions=positions, state=state, segment_ids=segment_ids)


def _full_remat(apply):
    """``apply(params, x, positions, None, segment_ids)`` keeping only its inputs for the
    backward pass (``remat: full``), whose recomputation waits for the output's cotangent.

    ``jax.checkpoint`` recomputes a block from its saved input, which nothing ties to the
    backward pass of the blocks after it: in a scanned group of several blocks (a hybrid's
    pattern) XLA was free to recompute every block of the group at once and hold all their
    intermediates together. Here the recomputation takes its inputs through one
    ``optimization_barrier`` with the cotangent, so it starts only when the next block's
    backward has produced that cotangent: one block's intermediates live at a time.
    """
    @jax.custom_vjp
    def run(params, x, positions, segment_ids):
        return apply(params, x, positions, None, segment_ids)

    def fwd(params, x, positions, segment_ids):
        return run(params, x, positions, segment_ids), (params, x, positions, segment_ids)

    def bwd(res, ct):
        (params, x), ct = jax.lax.optimization_barrier((res[:2], ct))
        _, vjp = jax.vjp(lambda p, x: apply(p, x, res[2], None, res[3]), params, x)
        return (*vjp(ct), None, None)

    run.defvjp(fwd, bwd)
    return lambda params, x, positions, state, segment_ids: run(params, x, positions,
                                                                  segment_ids)


def _mean_aux(auxes: list[dict]) -> dict:
    """Average each aux value over the layers that report it (a scanned stage's: ``[n]``)."""
    keys = sorted({k for a in auxes for k in a})
    return {k: jnp.mean(jnp.concatenate([jnp.ravel(a[k]) for a in auxes if k in a]))
            for k in keys}


def _make_block(cfg: ModelConfig, dims: MixerDims, layer: int, rngs: nnx.Rngs) -> Block:
    """Layer ``layer``'s block: its pattern backend, MoE or dense SwiGLU."""
    mixer = build_mixer(cfg.layer_backends[layer], dims, cfg.attention, rngs=rngs)
    dtype = DTYPES[cfg.dtype]
    if layer in cfg.moe.layers(cfg.n_layers):
        mlp = MoE(cfg.d_model, cfg.moe, mlp_dim=cfg.mlp_dim, dtype=dtype,
                  std=cfg.init_std, out_std=dims.out_std, rngs=rngs)
    else:
        mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, dtype=dtype, std=cfg.init_std,
                     out_std=dims.out_std, rngs=rngs)
    return Block(mixer, mlp, d_model=cfg.d_model, eps=cfg.norm_eps, rngs=rngs)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg  # frozen dataclass: static and hashable
        self.dtype = DTYPES[cfg.dtype]
        dims = mixer_dims(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs)
        backends = cfg.layer_backends
        make_block = functools.partial(_make_block, cfg, dims)
        if cfg.scan_layers:  # stages of stacked groups (longctx/model/layout.py, stack.py)
            self.stages = stack.build_stages(layout.stages(cfg), make_block, rngs)
        else:  # one block per layer, unrolled
            self.blocks = nnx.List([make_block(i, rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.lm_head = nnx.data(None if cfg.tie_embeddings else param(
            rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std))
        # A module around the whole stack (memory tokens), created last: the other weights
        # do not depend on it.
        self.wrapper = nnx.data(build_stack_wrapper(backends, dims, cfg.attention, rngs=rngs))

    # -- what generic code asks the model ------------------------------------------

    def runs_in_segments(self, seq_len: int) -> bool:
        """Whether a ``seq_len``-token sequence is run as a scan over segments."""
        N = self.cfg.segment_len
        return bool(N) and (seq_len > N or self.wrapper is not None)

    def tokens_processed(self, seq_len: int) -> int:
        """Tokens through every layer for a ``seq_len`` sequence (memory tokens add some)."""
        extra = self.wrapper.extra_tokens(seq_len) if self.wrapper is not None else 0
        return seq_len + extra

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        """Forward FLOPs of token mixing beyond the parameter matmuls, summed over layers."""
        if self.cfg.scan_layers:
            return stack.mixing_flops(self.stages, layout.stages(self.cfg), batch, seq_len,
                                      self.cfg.segment_len)
        return sum(b.mixer.mixing_flops(batch, seq_len, self.cfg.segment_len)
                   for b in self.blocks)

    def post_update(self, grads) -> None:
        """After an optimizer step: every submodule's ``post_update(its grads)`` hook
        (e.g. the MoE router bias of auxiliary-loss-free balancing)."""
        for path, module in nnx.iter_modules(self):
            if module is self or not hasattr(module, "post_update"):
                continue
            g = grads
            for key in path:
                g = g[key]
            module.post_update(g)

    # -- state protocol -------------------------------------------------------

    def init_state(self, batch_size: int, dtype=None):
        """Every layer's mixer state, the wrapper's, and the next position of each row.

        ``state["layers"]``: one state per layer, or with ``scan_layers`` one list per
        stage of its group's states stacked ``[n, ...]`` (per-layer view:
        :func:`longctx.model.layout.states_to_per_layer`).
        """
        dtype = self.dtype if dtype is None else dtype
        if self.cfg.scan_layers:
            layers = stack.init_states(self.stages, layout.stages(self.cfg), batch_size, dtype)
        else:
            layers = [b.mixer.init_state(batch_size, dtype) for b in self.blocks]
        state = {"layers": layers,
                 "next_pos": jnp.zeros((batch_size,), jnp.int32)}
        if self.wrapper is not None:
            state["wrapper"] = self.wrapper.init_state(batch_size, dtype)
        return state

    def step(self, tokens, state, *, segment_ids=None):
        """One segment ``tokens [B, S]`` with carried ``state`` -> (logits, aux, state)."""
        x, aux, new = self.hidden_step(tokens, state, segment_ids=segment_ids)
        return self.head(x), aux, new

    def hidden_step(self, tokens, state, *, segment_ids=None):
        """:meth:`step` before the head: ``(x [B, S, E], aux, state)``."""
        S = tokens.shape[1]
        positions = state["next_pos"][:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
        new = {"next_pos": state["next_pos"] + S}
        x = constrain(self.embed(tokens, self.dtype), ACTIVATION_AXES)  # [B, S, E]
        if self.wrapper is not None:
            x, positions, segment_ids, ctx = self.wrapper.enter(x, positions, segment_ids,
                                                                state["wrapper"])
        x, aux, new["layers"] = self._blocks(x, positions, state["layers"], segment_ids)
        if self.wrapper is not None:
            x, new["wrapper"] = self.wrapper.exit(x, ctx)
        return x, aux, new

    # -- forward ----------------------------------------------------------------

    def __call__(self, tokens, *, segment_ids=None):
        """``tokens [B, T]`` int -> ``(logits [B, T, vocab] float32, aux dict)``."""
        x, aux = self.hidden(tokens, segment_ids=segment_ids)
        return self.head(x), aux

    def hidden(self, tokens, *, segment_ids=None):
        """``tokens [B, T]`` -> ``(x [B, T, E], aux)``: the last block's output, before
        :meth:`head` (a loss can apply the head chunk by chunk, never holding
        ``[B, T, vocab]``)."""
        tokens = self._check_tokens(tokens)
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids shape {segment_ids.shape} != tokens shape {tokens.shape}")
        B, T = tokens.shape
        if not self.runs_in_segments(T):
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            n = self._zigzag_devices()  # context parallelism: permute once, not per layer
            if n:
                tokens, positions = context.zigzag(tokens), context.zigzag(positions)
                segment_ids = None if segment_ids is None else context.zigzag(segment_ids)
            x = constrain(self.embed(tokens, self.dtype), ACTIVATION_AXES)
            x, aux, _ = self._blocks(x, positions, None, segment_ids)
            if n:
                x = context.unzigzag(x)
            return x, aux
        return self._scan_segments(tokens, segment_ids)

    def _zigzag_devices(self) -> int:
        """Devices of the zigzag token order when the mesh splits the sequence and every
        mixer asks for it (``Mixer.token_layout``), else 0: natural order."""
        if context.active_strategy(self.cfg.attention.context_parallel) is None:
            return 0
        mixers = [m for _, m in nnx.iter_modules(self) if isinstance(m, Mixer)]
        if any(m.token_layout != "zigzag" for m in mixers):  # stacked or not: same modules
            return 0
        return context.axis_size()

    def _check_tokens(self, tokens):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [batch, time]; got "
                             f"shape {tokens.shape} dtype {tokens.dtype}")
        if not isinstance(tokens, jax.core.Tracer):  # concrete input: check the ids now
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size}); "
                                 f"got min {lo}, max {hi}")
        return tokens

    def _blocks(self, x, positions, layer_states, segment_ids):
        """Every block over ``x [B, S, E]`` -> ``(x, mean aux, new layer states)``."""

        def run_block(block, x, state, in_scan):
            if self.cfg.remat == "none":
                x, state, aux = block(x, positions=positions, state=state, segment_ids=segment_ids)
            else:  # inside lax.scan the remat boundary needs no CSE barrier (jax.checkpoint docs)
                if self.cfg.remat in OFFLOADING and targets.platform() == "cpu":
                    raise ValueError(f"model.remat={self.cfg.remat!r} offloads to host memory, "
                                     f"which the target platform 'cpu' does not have; use "
                                     f"'dots' (or compile for a TPU / GPU target)")
                graphdef, params = nnx.split(block)
                if self.cfg.remat == "full" and state is None:
                    f = _full_remat(functools.partial(_apply_block, graphdef))
                else:
                    f = jax.checkpoint(functools.partial(_apply_block, graphdef),
                                       policy=REMAT_POLICIES[self.cfg.remat],
                                       prevent_cse=not in_scan)
                x, state, aux = f(params, x, positions, state, segment_ids)
            return constrain(x, ACTIVATION_AXES), state, aux

        if self.cfg.scan_layers:
            x, auxes, new_states = stack.run_stages(self.stages, layout.stages(self.cfg), x,
                                                    layer_states, run_block)
            return x, _mean_aux(auxes), new_states
        new_states, auxes = [], []
        for i, block in enumerate(self.blocks):
            x, state, aux = run_block(block, x, None if layer_states is None else layer_states[i],
                                      False)
            new_states.append(state)
            auxes.append(aux)
        return x, _mean_aux(auxes), new_states

    def head(self, x):
        """Final norm and LM head: ``[B, S, E]`` -> logits ``[B, S, vocab]`` float32."""
        x = self.final_norm(x)
        if self.lm_head is None:
            return self.embed.attend(x)
        return jnp.einsum("bse,ev->bsv", x, self.lm_head[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)

    def _scan_segments(self, tokens, segment_ids):
        B, T = tokens.shape
        N = self.cfg.segment_len
        n = segments.num_segments(T, N)
        data = {"tokens": tokens}
        if segment_ids is not None:
            data["segment_ids"] = segment_ids
        data = segments.pad_time(data, n * N, {"tokens": 0, "segment_ids": -1})
        graphdef, params = nnx.split(self)

        def segment(params, state, seg, i):
            model = nnx.merge(graphdef, params)
            x, aux, state = model.hidden_step(seg["tokens"], state,
                                              segment_ids=seg.get("segment_ids"))
            return state, (x, aux)

        _, (x, aux) = segments.scan_segments(
            segment, params, self.init_state(B), data, jnp.arange(n, dtype=jnp.int32),
            segment_len=N, bptt=self.cfg.bptt_segments)
        x = x.swapaxes(0, 1).reshape(B, n * N, -1)[:, :T]  # [B, T, E]
        return x, jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Transformer:
    """Validate the model section and build the model (float32 parameters)."""
    validate_model(cfg)
    return Transformer(cfg, rngs=rngs)
