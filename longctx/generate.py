"""Generation with any backend: prefill the prompt, then decode in one jitted loop.

    out = longctx.generate(model, prompt, max_new_tokens=64)                 # greedy
    out = longctx.generate(model, prompt, max_new_tokens=64, temperature=0.8,
                           top_k=50, top_p=0.95, seed=1, eos_id=tok.token_to_id("</s>"))
    python -m longctx.generate --run-dir RUN --tokenizer TOK --prompt TEXT [--max-new-tokens N]

The model's own state protocol does all the work, so every backend and every hybrid
decodes the same way: ``state = model.init_state(B)``; the prompt goes through
``model.step`` (one segment at a time when the model runs in segments, since
segment mixers and memory tokens read and write per segment; else in pieces of
``prefill_chunk`` tokens, default the whole prompt at once); then a
``lax.while_loop`` samples a token from the last logits and feeds it back as a
one-token segment, carrying each layer's state (KV cache, recurrent matrix state,
XL ring and memories, ...). Prefill and decode are one ``jax.jit`` per (model,
prompt shape, sampling settings); ``seed`` and ``eos_id`` are traced values.

Sampling: ``temperature == 0`` is greedy (argmax); else the logits are divided by
``temperature``, restricted to the ``top_k`` largest and to the smallest set whose
probability reaches ``top_p`` (nucleus; the most probable token always stays),
and sampled with ``jax.random.fold_in(PRNGKey(seed), step)`` -- reproducible from
``seed``. A row that emits ``eos_id`` stops: its later positions hold ``eos_id``;
the loop ends when every row has stopped.

Exact attention keeps ``model.max_seq_len`` keys in its ring cache: past that many
tokens its layers see only the last ``max_seq_len`` (a warning says so); the CLI
builds the model with ``max_seq_len`` raised to prompt + new tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.data.prepare import load_tokenizer
from longctx.evals.core import load_model

log = logging.getLogger(__name__)

__all__ = ["generate", "prefill", "decode", "sample_logits", "main"]


def sample_logits(logits, key, *, temperature: float, top_k: int | None, top_p: float | None):
    """``logits [B, V]`` float32 -> token ids ``[B]`` int32 (see the module docstring)."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]: the k-th largest
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, -1)
        before = jnp.cumsum(probs, -1) - probs  # probability of the tokens ranked above
        drop_sorted = before >= top_p  # rank 0 has before = 0: always kept
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill(model, tokens, piece: int):
    """``tokens [B, T]`` through ``model.step`` in pieces of ``piece`` tokens (the last
    one shorter) -> ``(logits of the last token [B, V], state)``."""
    B, T = tokens.shape
    state = model.init_state(B)
    n = T // piece
    logits = None
    if n > 1:  # a scan over whole pieces (one compiled step however long the prompt)
        graphdef, params = nnx.split(model)

        def body(state, seg):
            logits, _, state = nnx.merge(graphdef, params).step(seg, state)
            return state, logits[:, -1]

        pieces = tokens[:, :n * piece].reshape(B, n, piece).swapaxes(0, 1)  # [n, B, piece]
        state, last = jax.lax.scan(body, state, pieces)
        logits = last[-1]
    elif n == 1:
        out, _, state = model.step(tokens[:, :piece], state)
        logits = out[:, -1]
    if n * piece < T:
        out, _, state = model.step(tokens[:, n * piece:], state)
        logits = out[:, -1]
    return logits, state


def decode(model, logits, state, seed, eos_id, *, max_new_tokens: int, temperature: float,
           top_k: int | None, top_p: float | None, stream=None):
    """The decode loop from the prefill's ``logits [B, V]`` and ``state``: one
    ``lax.while_loop`` of sample -> ``model.step(token)``; ``seed`` uint32 and ``eos_id``
    int32 (-1: none) are traced. Returns the new tokens ``[B, max_new_tokens]`` int32."""
    graphdef, params = nnx.split(model)
    B = logits.shape[0]
    key = jax.random.PRNGKey(seed)
    has_eos = eos_id >= 0
    out0 = jnp.full((B, max_new_tokens), jnp.where(has_eos, eos_id, 0), jnp.int32)

    def cond(c):
        i, _, _, _, done = c
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, logits, state, out, done = c
        tok = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature,
                            top_k=top_k, top_p=top_p)
        tok = jnp.where(done, eos_id, tok)  # stopped rows: padding
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        done = done | (has_eos & (tok == eos_id))
        if stream is not None:  # host callback, in order: the caller prints as tokens come
            jax.debug.callback(stream, tok, done, ordered=True)
        logits, _, state = nnx.merge(graphdef, params).step(tok[:, None], state)
        return i + 1, logits[:, -1], state, out, done

    c = (jnp.int32(0), logits, state, out0, jnp.zeros((B,), bool))
    return jax.lax.while_loop(cond, body, c)[3]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "piece", "stream"))
def _generate(graphdef, params, tokens, seed, eos_id, *, max_new_tokens, temperature, top_k,
              top_p, piece, stream):
    model = nnx.merge(graphdef, params)
    logits, state = prefill(model, tokens, piece)
    out = decode(model, logits, state, seed, eos_id, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, stream=stream)
    return jnp.concatenate([tokens.astype(jnp.int32), out], axis=1)


def generate(model, tokens, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, prefill_chunk: int | None = None, stream=None):
    """``tokens [B, T]`` int (the prompts, all ``T`` long) -> ``[B, T + max_new_tokens]`` int32.

    ``stream``: ``None`` or a function called on the host with each step's tokens
    ``[B]`` and stopped flags ``[B]`` (numpy), in order, while the loop runs.
    ``prefill_chunk``: prompt tokens per ``model.step`` call when the model does not run
    in segments (default: the whole prompt in one call; a smaller piece bounds the
    ``[piece, max_seq_len]`` scores of exact attention); segment models always prefill
    one ``model.segment_len`` segment at a time.
    """
    tokens = jnp.asarray(tokens)
    V = model.cfg.vocab_size
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be a non-empty int array [batch, time]; got shape "
                         f"{tokens.shape} dtype {tokens.dtype}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={V}); got min {lo}, max {hi}")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be >= 1")
    if temperature < 0 or (top_k is not None and top_k < 1) or (
            top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"{temperature=} must be >= 0, {top_k=} >= 1 or None, "
                         f"{top_p=} in (0, 1] or None")
    if eos_id is not None and not 0 <= eos_id < V:
        raise ValueError(f"{eos_id=} must be in [0, vocab_size={V})")
    T = tokens.shape[1]
    N = model.cfg.segment_len
    piece = N if N else min(prefill_chunk or T, T)
    if T + max_new_tokens > model.cfg.max_seq_len:
        log.warning("generating to %d tokens > model.max_seq_len=%d: exact attention layers "
                    "see only the last max_seq_len tokens", T + max_new_tokens,
                    model.cfg.max_seq_len)
    graphdef, params = nnx.split(model)
    return _generate(graphdef, params, tokens, jnp.uint32(seed),
                     jnp.int32(-1 if eos_id is None else eos_id),
                     max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                     top_k=None if top_k is None else int(top_k),
                     top_p=None if top_p is None else float(top_p), piece=int(piece),
                     stream=stream)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longctx.generate",
                                description="Generate text from a trainer run's latest checkpoint.")
    p.add_argument("--run-dir", required=True, help="the trainer's run directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a HF model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos", default=None, help="stop at this token (default: data.eos_id, or "
                   "the eos_id in meta.json of a prepared data.path; else no stop)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. 'model.rope_scaling={type: linear, factor: 4}'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    try:
        prompt = args.prompt if args.prompt is not None else open(
            args.prompt_file, encoding="utf-8").read()
        tok, _ = load_tokenizer(args.tokenizer)
        ids = tok.encode(prompt, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        cfg, model, _ = load_model(args.run_dir, args.overrides,
                                   max_len=len(ids) + args.max_new_tokens)
        eos_id = _eos_id(tok, args.eos, cfg)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    new: list[int] = []
    printed = [""]

    def stream(tok_ids, done):  # decode everything so far: multi-token characters print whole
        del done  # a stopped row repeats eos_id, skipped below
        if eos_id is not None and int(tok_ids[0]) == eos_id:
            return
        new.append(int(tok_ids[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    sys.stdout.write(prompt)
    sys.stdout.flush()
    generate(model, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
             eos_id=eos_id, stream=stream).block_until_ready()
    jax.effects_barrier()
    sys.stdout.write(tok.decode(new)[len(printed[0]):] + "\n")
    return 0


def _eos_id(tok, eos: str | None, cfg) -> int | None:
    """``--eos`` by name, else the training data's EOS id (config or prepared meta.json)."""
    if eos is not None:
        i = tok.token_to_id(eos)
        if i is None:
            raise ValueError(f"unknown EOS token {eos!r}: not in the tokenizer's vocabulary")
        return int(i)
    if cfg.data.eos_id is not None:
        return int(cfg.data.eos_id)
    meta = os.path.join(cfg.data.path or "", "meta.json")
    if cfg.data.source == "tokens" and os.path.isfile(meta):
        with open(meta, encoding="utf-8") as fh:
            return int(json.load(fh)["eos_id"])
    return None


if __name__ == "__main__":
    sys.exit(main())
