"""The RULER-style suite on a model: accuracy, exact match and answer log-probability by task,
length and depth, plus a summary score per length.

    python -m longctx.evals --run-dir runs/ruler --task ruler --lengths 256 1024 4096

Every example is teacher forced (``longctx.data.ruler``): the model reads the
haystack, the question and the answer so far, and is scored on each next answer
token. Each cell reports two metrics side by side (Schaeffer et al. 2023, "Are
Emergent Abilities of Large Language Models a Mirage?": a discontinuous metric
can make smooth improvement look like a jump):

* ``exact_match``: the fraction of examples whose every answer token is the argmax
  (discontinuous);
* ``accuracy``: the fraction of answer tokens that are the argmax;
* ``answer_logprob``: the mean per-token log-probability of the answer
  (continuous; 0 is perfect, ``-log(vocab_size)`` is chance).

The summary row (``subtask: "score"``) averages each metric over the tasks at one
length (each task first averaged over its depths), as RULER averages task scores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.config import task_kwargs
from longctx.data import ruler, synthetic

__all__ = ["score_batch", "task_eval", "ruler_eval", "summarize"]

METRICS = ("accuracy", "exact_match", "answer_logprob")


@nnx.jit
def _forward(model, tokens, targets):
    """tokens/targets int32 [B, T] -> (argmax int32 [B, T], log p(target) float32 [B, T])."""
    logits, _ = model(tokens)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return (jnp.argmax(logits, -1).astype(jnp.int32),
            jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])


def score_batch(model, batch) -> dict[str, np.ndarray]:
    """Per-example scores of a teacher-forced batch (``tokens``/``targets``/``loss_mask`` [B, T]).

    Returns ``correct`` and ``scored`` (int [B], answer tokens right / in all),
    ``exact`` (bool [B]) and ``logprob`` (float [B], summed over the answer tokens).
    """
    pred, logp = _forward(model, jnp.asarray(batch["tokens"], jnp.int32),
                          jnp.asarray(batch["targets"], jnp.int32))
    mask = np.asarray(batch["loss_mask"]) > 0
    hit = (np.asarray(pred) == np.asarray(batch["targets"])) & mask
    correct, scored = hit.sum(1), mask.sum(1)
    return {"correct": correct, "scored": scored, "exact": correct == scored,
            "logprob": np.where(mask, np.asarray(logp), 0.0).sum(1)}


def task_eval(model, cfg, task, *, length, examples=16, seed=None, batch_size=8, **kwargs):
    """``{accuracy, exact_match, answer_logprob}`` of any synthetic task (``synthetic.TASKS``:
    a RULER task, the ``ruler`` mixture, passkey, mqar, ...) at ``length``.

    The task's options are the config's (``task_kwargs`` with ``data.task=task``), updated
    by ``kwargs`` (e.g. ``depth=0.5``); examples from ``cfg.data.eval_seed`` unless ``seed``.
    """
    if task not in synthetic.TASKS:
        raise ValueError(f"task_eval: unknown {task=}; expected one of {sorted(synthetic.TASKS)}")
    kw = {**task_kwargs(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=task))),
          **kwargs}
    seed = cfg.data.eval_seed if seed is None else seed
    tot = {"correct": 0, "scored": 0, "exact": 0, "logprob": 0.0}
    for start in range(0, examples, batch_size):
        b = synthetic.make_batch(task, seed=seed, start_index=start,
                                 batch_size=min(batch_size, examples - start), seq_len=length,
                                 vocab_size=cfg.model.vocab_size, **kw)
        s = score_batch(model, b)
        for k in tot:
            tot[k] += s[k].sum()
    return {"accuracy": float(tot["correct"] / tot["scored"]),
            "exact_match": float(tot["exact"] / examples),
            "answer_logprob": float(tot["logprob"] / tot["scored"])}


def ruler_eval(model, cfg, *, lengths, depths=(0.0, 0.5, 1.0), examples=16, tasks=None,
               batch_size=8, seed=None):
    """Rows ``{task: "ruler", subtask, length, depth, accuracy, exact_match, answer_logprob}``.

    ``tasks``: names in ``longctx.data.ruler.RULER_TASKS`` (default: all). Depth tasks
    (NIAH, vt) run at every depth in ``depths``; ``cwe``/``fwe`` once (``depth`` None).
    Examples come from the held-out stream ``cfg.data.eval_seed`` unless ``seed``.
    Ends with the summary rows (`summarize`).
    """
    tasks = list(ruler.RULER_TASKS if tasks is None else tasks)
    bad = [t for t in tasks if t not in ruler.RULER_TASKS]
    if bad:
        raise ValueError(f"ruler_eval: unknown tasks {bad}; expected some of {ruler.RULER_TASKS}")
    if examples < 1:
        raise ValueError(f"ruler_eval: {examples=} must be >= 1")
    seed = cfg.data.eval_seed if seed is None else seed
    rows = []
    for L in lengths:
        for task in tasks:
            for d in (depths if task in ruler.DEPTH_TASKS else [None]):
                rows.append({"task": "ruler", "subtask": task, "length": int(L),
                             "depth": None if d is None else float(d),
                             **task_eval(model, cfg, task, length=L, examples=examples,
                                         seed=seed, batch_size=batch_size, depth=d)})
    return rows + summarize(rows)


def summarize(rows):
    """One ``subtask: "score"`` row per length: each metric averaged over tasks (tasks over depths)."""
    out = []
    for L in sorted({r["length"] for r in rows if r["subtask"] != "score"}):
        per_task = {}
        for r in rows:
            if r["length"] == L and r["subtask"] != "score":
                per_task.setdefault(r["subtask"], []).append(r)
        out.append({"task": "ruler", "subtask": "score", "length": L, "depth": None,
                    **{m: float(np.mean([np.mean([r[m] for r in rs])
                                         for rs in per_task.values()])) for m in METRICS}})
    return out
