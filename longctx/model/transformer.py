"""Decoder-only language model with pluggable token mixers and segment scanning.

    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    logits, aux = model(tokens)          # [B, T] int32 -> [B, T, vocab] float32, dict

Block (pre-norm): ``x += mixer(norm(x)); x += ffn(norm(x))``; then a final norm
and the LM head (tied to the embedding or not).

Two ways to run a sequence, chosen by ``model.segment_len``:

* ``0``: one pass over the whole sequence, every mixer stateless.
* ``N``: ``lax.scan`` over N-token segments carrying every layer's state (the
  mixer state protocol, ``longctx.model.mixers``). Each segment is one
  ``jax.checkpoint`` (only the carried state is saved between segments), and
  with ``bptt_segments = k`` the carried state passes through
  ``stop_gradient`` every k segments, so gradients flow back at most k
  segments (truncated BPTT). A last partial segment is padded at the end and
  its padding dropped; causality keeps the padding invisible to real tokens.

Decoding is the same mechanism with a segment of one token::

    state = model.init_state(batch_size)
    logits, aux, state = model.step(tokens[:, t:t+1], state)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ModelConfig, validate_model
from longctx.model.layers import DTYPES, Embed, RMSNorm, SwiGLU, param
from longctx.model.moe import MoE, moe_layers
from longctx.parallel.sharding import constrain

# Activations between blocks: batch over the data-parallel axes, length over
# `sequence`, the embedding dimension whole (a no-op outside the trainer's mesh).
ACTIVATION_AXES = ("batch", "length", None)

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class Block(nnx.Module):
    """Pre-norm residual block: mixer then feed-forward (dense SwiGLU or MoE, by layer)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        from longctx.attention.registry import BACKENDS  # registry imports the mixers

        dtype = DTYPES[cfg.dtype]
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mixer = BACKENDS[cfg.attention.backend](cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        if layer in moe_layers(cfg):  # model.moe.every / first_dense_layers
            self.mlp = MoE(cfg.d_model, cfg.moe, mlp_dim=cfg.mlp_dim, dtype=dtype,
                           std=cfg.init_std, out_std=out_std, rngs=rngs)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, dtype=dtype, std=cfg.init_std,
                              out_std=out_std, rngs=rngs)

    def __call__(self, x, *, positions, state=None, segment_ids=None):
        h, new_state = self.mixer(self.attn_norm(x), positions=positions, state=state,
                                  segment_ids=segment_ids)
        x = x + h.astype(x.dtype)
        aux = {}
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(self.mlp_norm(x))  # aux: MoE losses and load statistics
        else:
            h = self.mlp(self.mlp_norm(x))
        x = x + h.astype(x.dtype)
        return x, new_state, aux


def memory_tokens(cfg: ModelConfig) -> int:
    """Memory tokens per segment (``model.attention.recurrent.num_memory_tokens``; recurrent only)."""
    return cfg.attention.recurrent.num_memory_tokens if cfg.attention.backend == "recurrent" else 0


def _apply_block(graphdef, params, x, positions, state, segment_ids):
    block = nnx.merge(graphdef, params)
    return block(x, positions=positions, state=state, segment_ids=segment_ids)


def _mean_aux(auxes: list[dict]) -> dict:
    """Average each aux scalar over the layers that report it."""
    keys = sorted({k for a in auxes for k in a})
    return {k: jnp.mean(jnp.stack([a[k] for a in auxes if k in a])) for k in keys}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg  # frozen dataclass: static and hashable
        self.dtype = DTYPES[cfg.dtype]
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs, layer=i) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.lm_head = nnx.data(None if cfg.tie_embeddings else param(
            rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std))
        M = memory_tokens(cfg)  # created last: the other weights do not depend on it
        self.memory = nnx.data(None if not M else param(
            rngs, (M, cfg.d_model), (None, "embed"), std=cfg.init_std))

    # -- state protocol -------------------------------------------------------

    def init_state(self, batch_size: int, dtype=None):
        """Every layer's mixer state plus the next absolute position of each row."""
        dtype = self.dtype if dtype is None else dtype
        state = {
            "layers": [b.mixer.init_state(batch_size, dtype) for b in self.blocks],
            "next_pos": jnp.zeros((batch_size,), jnp.int32),
        }
        if self.memory is not None:  # memory tokens: the learned initial memory, its document
            state["memory"] = jnp.broadcast_to(self.memory[...].astype(dtype),
                                               (batch_size, *self.memory.shape))
            state["memory_seg"] = jnp.zeros((batch_size,), jnp.int32)
        return state

    def step(self, tokens, state, *, segment_ids=None):
        """One segment ``tokens [B, S]`` with carried ``state`` -> (logits, aux, state)."""
        B, S = tokens.shape
        positions = state["next_pos"][:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
        new = {"next_pos": state["next_pos"] + S}
        memory = None
        if self.memory is not None:
            commit = (positions[:, -1] + 1) % self.cfg.segment_len == 0  # the segment ends here
            memory, new["memory"], new["memory_seg"], segment_ids = self._memory_tokens(
                state, positions, segment_ids, commit)
        logits, aux, new["layers"] = self._forward(tokens, positions, state["layers"],
                                                   segment_ids, memory)
        if memory is not None:
            logits, written = logits
            new["memory"] = jnp.where(commit[:, None, None], written.astype(new["memory"].dtype),
                                      new["memory"])
        return logits, aux, new

    def _memory_tokens(self, state, positions, segment_ids, commit):
        """Read / write memory of a segment (Recurrent Memory Transformer; see recurrent.py).

        Both the read and the write tokens enter as the carried memory (as in RMT's
        decoder): the write tokens' residual stream carries the memory on, so keeping it
        unchanged across segments is the default and the layers learn what to add.

        Returns ``((read [B, M, E], write [B, M, E]), memory, memory_seg, ids)``:
        ``memory`` the memory to carry when the segment does not end here (``commit
        [B]`` False; ``step`` commits the write), ``memory_seg`` its document, and
        ``ids [B, M + S + M]`` the document ids of ``[read ; segment ; write]``. A row
        whose segment starts a new document reads the learned initial memory; a
        document that starts inside a segment reads no memory until the next segment.
        """
        B, S = positions.shape
        ids = (jnp.zeros((B, S), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))
        fresh = jnp.broadcast_to(self.memory[...].astype(state["memory"].dtype),
                                 state["memory"].shape)
        reset = (positions[:, 0] % self.cfg.segment_len == 0) & (ids[:, 0] != state["memory_seg"])
        memory = jnp.where(reset[:, None, None], fresh, state["memory"])
        mseg = jnp.where(reset, ids[:, 0], state["memory_seg"])
        last = ids[:, -1]
        M = self.memory.shape[0]
        ids_ext = jnp.concatenate([jnp.broadcast_to(mseg[:, None], (B, M)), ids,
                                   jnp.broadcast_to(last[:, None], (B, M))], axis=1)
        # the write tokens continue the read memory only within the same document
        write = jnp.where((mseg == last)[:, None, None], memory, fresh)
        return (memory, write), memory, jnp.where(commit, last, mseg), ids_ext

    # -- forward ----------------------------------------------------------------

    def __call__(self, tokens, *, segment_ids=None):
        """``tokens [B, T]`` int -> ``(logits [B, T, vocab] float32, aux dict)``."""
        tokens = self._check_tokens(tokens)
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids shape {segment_ids.shape} != tokens shape {tokens.shape}")
        B, T = tokens.shape
        if self.memory is None and (self.cfg.segment_len == 0 or self.cfg.segment_len >= T):
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            logits, aux, _ = self._forward(tokens, positions, None, segment_ids)
            return logits, aux
        return self._scan_segments(tokens, segment_ids)

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

    def _forward(self, tokens, positions, layer_states, segment_ids, memory=None):
        x = constrain(self.embed(tokens, self.dtype), ACTIVATION_AXES)  # [B, S, E]
        if memory is not None:  # [read ; segment ; write], memory positions -1 (unused)
            read, write = memory
            M, S = read.shape[1], x.shape[1]
            x = jnp.concatenate([read.astype(x.dtype), x, write.astype(x.dtype)], axis=1)
            none = jnp.full((x.shape[0], M), -1, jnp.int32)
            positions = jnp.concatenate([none, positions, none], axis=1)
        new_states, auxes = [], []
        for i, block in enumerate(self.blocks):
            state = None if layer_states is None else layer_states[i]
            if self.cfg.remat == "none":
                x, state, aux = block(x, positions=positions, state=state, segment_ids=segment_ids)
            else:
                graphdef, params = nnx.split(block)
                f = jax.checkpoint(functools.partial(_apply_block, graphdef),
                                   policy=REMAT_POLICIES[self.cfg.remat])
                x, state, aux = f(params, x, positions, state, segment_ids)
            x = constrain(x, ACTIVATION_AXES)
            new_states.append(state)
            auxes.append(aux)
        written = None
        if memory is not None:  # the last layer's outputs at the write positions
            written, x = x[:, M + S:], x[:, M:M + S]
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("bse,ev->bsv", x, self.lm_head[...].astype(x.dtype),
                                preferred_element_type=jnp.float32)
        if written is not None:
            logits = (logits, written)
        return logits, _mean_aux(auxes), new_states

    def _scan_segments(self, tokens, segment_ids):
        B, T = tokens.shape
        N, k = self.cfg.segment_len, self.cfg.bptt_segments
        n = -(-T // N)
        pad = n * N - T
        tok = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(B, n, N).swapaxes(0, 1)  # [n, B, N]
        seg = None
        if segment_ids is not None:
            seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
            seg = seg.reshape(B, n, N).swapaxes(0, 1)
        graphdef, params = nnx.split(self)

        @jax.checkpoint  # per segment: the backward pass recomputes a segment from its state
        def segment(params, state, i, tok_i, seg_i):
            if k:  # truncated BPTT: cut the gradient through the carried state every k segments
                cut = (i % k == 0) & (i > 0)
                state = jax.tree.map(
                    lambda s: jnp.where(cut, jax.lax.stop_gradient(s), s), state)
            model = nnx.merge(graphdef, params)
            return model.step(tok_i, state, segment_ids=seg_i)

        def body(carry, xs):
            state, i = carry
            tok_i, seg_i = xs
            logits, aux, state = segment(params, state, i, tok_i, seg_i)
            return (state, i + 1), (logits, aux)

        init = (self.init_state(B), jnp.asarray(0, jnp.int32))
        _, (logits, aux) = jax.lax.scan(body, init, (tok, seg))
        logits = logits.swapaxes(0, 1).reshape(B, n * N, -1)[:, :T]
        return logits, jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Transformer:
    """Validate the model section and build the model (float32 parameters)."""
    validate_model(cfg)
    return Transformer(cfg, rngs=rngs)
