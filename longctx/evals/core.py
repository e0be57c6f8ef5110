"""Long-context evaluations of a trained checkpoint: passkey by depth and length, MQAR,
the RULER-style suite (``longctx/evals/ruler.py``), perplexity by position
(``longctx/evals/perplexity.py``), passkey retrieval in held-out text
(``longctx/evals/passkey_text.py``).

    python -m longctx.evals --run-dir runs/tiny --task mqar --lengths 64 128
    python -m longctx.evals --run-dir runs/passkey --task passkey --lengths 256 1024 4096
    python -m longctx.evals --run-dir runs/ruler --task ruler --lengths 256 1024 --depths 0 0.5 1
    python -m longctx.evals --run-dir runs/text --task perplexity --lengths 1024 --data DIR
    python -m longctx.evals --run-dir runs/text --task passkey_text --lengths 1024 --tokenizer TOK

The run directory is the trainer's: its ``config.yaml`` rebuilds the model and the
newest readable checkpoint in ``checkpoints/`` supplies the parameters (the model's
part only, restored onto one device; no optimizer state is allocated). The model is
built from the config *as evaluated*: overrides, and a KV cache
(``model.max_seq_len``) raised to the longest evaluated length, are applied before
building, so a ``full`` model scanned in segments keeps every key at any length. "Train short, test long": the model runs at every requested
length on held-out examples (``data.eval_seed``), whatever length it was
trained at.

* passkey: for each length and each depth in ``--depths`` (relative position of
  the needle in the haystack), ``--examples`` sequences; reports the accuracy of
  the passkey digits (per digit) and the exact-match rate (all digits right).
* mqar: accuracy at the query positions, per length.
* passkey_text: the passkey phrases written out in held-out text (``--data`` or
  ``data.eval_path``), encoded by ``--tokenizer`` (default: UTF-8 bytes), by length and depth.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from longctx.config import load_config, with_overrides
from longctx.data import synthetic
from longctx.data.ruler_text import tokenizer_encoder
from longctx.evals.passkey_text import passkey_text_eval
from longctx.evals.perplexity import load_tokens, perplexity_eval
from longctx.evals.ruler import ruler_eval
from longctx.parallel import sharding as shd
from longctx.train.checkpoint import Checkpointer
from longctx.train.state import TrainState


def load_model(run_dir: str, overrides=(), *, max_len: int | None = None):
    """(config, model, step) from a trainer run directory; raises if nothing is restorable.

    ``max_len``: the longest sequence the model will see; ``model.max_seq_len`` (the
    KV cache of exact attention carried across segments) is raised to it *before*
    the model is built.
    """
    path = epath.Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no config.yaml in run directory {run_dir!r}")
    cfg = load_config(str(path), list(overrides))
    if max_len is not None and max_len > cfg.model.max_seq_len:
        cfg = with_overrides(cfg, [f"model.max_seq_len={max_len}"])
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    ts = TrainState.create(cfg, mesh, shd.DEFAULT_RULES, with_optimizer=False)
    ckpt = Checkpointer(str(epath.Path(run_dir) / "checkpoints"), keep=cfg.checkpoint.keep,
                        async_save=False)
    restored = ts.restore(ckpt)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint under {run_dir}/checkpoints")
    return cfg, ts.model(), restored[0]


def _predict(model, tokens):
    logits, _ = model(jnp.asarray(tokens))
    return np.asarray(jnp.argmax(logits, -1))


def passkey_eval(model, cfg, *, lengths, depths, examples, batch_size=8):
    """Rows ``{length, depth, accuracy, exact_match}``."""
    V, n = cfg.model.vocab_size, cfg.data.passkey_len
    rows = []
    for L in lengths:
        for d in depths:
            correct, exact, total = 0, 0, 0
            for start in range(0, examples, batch_size):
                ex = [synthetic.passkey(cfg.data.eval_seed, i, seq_len=L, vocab_size=V,
                                        passkey_len=n, depth=d)
                      for i in range(start, min(start + batch_size, examples))]
                tok = np.stack([e["tokens"] for e in ex])
                tgt = np.stack([e["targets"] for e in ex])
                mask = np.stack([e["loss_mask"] for e in ex]) > 0
                hit = (_predict(model, tok) == tgt) & mask
                correct += int(hit.sum())
                total += int(mask.sum())
                exact += int((hit.sum(1) == mask.sum(1)).sum())
            rows.append({"task": "passkey", "length": L, "depth": float(d),
                         "accuracy": correct / total, "exact_match": exact / examples})
    return rows


def mqar_eval(model, cfg, *, lengths, examples, batch_size=8):
    V, pairs = cfg.model.vocab_size, cfg.data.num_kv_pairs
    rows = []
    for L in lengths:
        correct = total = 0
        for start in range(0, examples, batch_size):
            b = synthetic.make_batch("mqar", seed=cfg.data.eval_seed, start_index=start,
                                     batch_size=min(batch_size, examples - start), seq_len=L,
                                     vocab_size=V, num_kv_pairs=pairs)
            mask = b["loss_mask"] > 0
            correct += int(((_predict(model, b["tokens"]) == b["targets"]) & mask).sum())
            total += int(mask.sum())
        rows.append({"task": "mqar", "length": L, "accuracy": correct / total})
    return rows


TASKS = ("passkey", "mqar", "ruler", "perplexity", "passkey_text")


def run(run_dir, *, task, lengths, depths=(0.0, 0.25, 0.5, 0.75, 1.0), examples=32,
        overrides=(), out=None, ruler_tasks=None, data=None, tokenizer=None):
    """Evaluate ``run_dir``'s newest checkpoint on ``task`` at every length; rows, also
    appended to ``out`` (default ``RUN_DIR/eval_TASK.jsonl``).

    ``ruler_tasks``: a subset of the RULER suite (default all); ``data``: held-out
    tokens for ``perplexity`` and ``passkey_text`` (default the run's ``data.eval_path``);
    ``tokenizer``: ``passkey_text``'s (a ``tokenizer.json`` or Hugging Face directory;
    default UTF-8 bytes).
    """
    if task not in TASKS:
        raise ValueError(f"unknown eval task {task!r}; expected one of {TASKS}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"{lengths=}: expected one or more positive lengths")
    cfg, model, step = load_model(run_dir, overrides, max_len=max(lengths))
    if task == "passkey":
        rows = passkey_eval(model, cfg, lengths=lengths, depths=depths, examples=examples)
    elif task == "mqar":
        rows = mqar_eval(model, cfg, lengths=lengths, examples=examples)
    elif task == "ruler":
        rows = ruler_eval(model, cfg, lengths=lengths, depths=depths, examples=examples,
                          tasks=ruler_tasks)
    elif task == "perplexity":
        rows = perplexity_eval(model, cfg, lengths=lengths, examples=examples, path=data)
    else:
        path = data or cfg.data.eval_path
        if path is None:
            raise ValueError("passkey_text: no held-out text: set data.eval_path (or --data)")
        rows = passkey_text_eval(
            model, load_tokens(path, dtype=cfg.data.token_dtype, vocab_size=cfg.model.vocab_size),
            lengths=lengths, depths=depths, examples=examples, vocab_size=cfg.model.vocab_size,
            seed=cfg.data.eval_seed, encode=tokenizer and tokenizer_encoder(tokenizer))
    for r in rows:
        r.update(step=step, trained_seq_len=cfg.data.seq_len)
    out = out or os.path.join(run_dir, f"eval_{task}.jsonl")
    with epath.Path(out).open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows
