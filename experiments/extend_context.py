"""Extending a trained model's context: RoPE as trained, position interpolation, NTK-aware,
dynamic NTK, YaRN and Llama 3 scaling compared zero-shot and after a short fine-tune, as
the YaRN paper does (Peng et al. 2023, arXiv 2309.00071, tables 1-5).

    nice -n 5 python -m experiments.extend_context --out runs/extend_context_exp   # default
    python -m experiments.extend_context --quick --out runs/extend_context_quick  # smoke run
    python -m experiments.extend_context --data DIR --eval-data HELD_OUT --tokenizer TOK
    python -m experiments.extend_context --from-results runs/extend_context_exp/results.jsonl

1. Corpus: the byte-level standard-library corpus of ``experiments.perplexity_by_position``
   (token = UTF-8 byte, every 10th file held out), or ``--data`` (a prepared directory or
   ``.bin`` tokens; ``--eval-data`` the held-out part, ``--tokenizer`` the passkey's encoder).
2. Per seed, a base model (``BASE``: a small Llama-shaped ``full`` model, no q/k/v conv) is
   trained by the project's trainer for ``--base-steps`` at ``--l0`` tokens.
3. For every method of ``METHODS`` and factor ``s`` of ``--factors``:

   * ``zero_shot``: the base checkpoint with ``model.rope_scaling`` of the method (an eval
     override, nothing retrained);
   * ``finetuned``: the child run directory written by ``python -m longctx.inherit`` (ratio 1:
     the parent's weights exactly, the method's RoPE, ``data.seq_len = s * l0``, a fresh
     optimizer), then trained by ``longctx.train`` for ``--ft-steps`` of ``--ft-batch-tokens``
     tokens each: one budget for every method and factor, its ratio to the pretraining tokens
     recorded as ``ft_fraction``.

   Each is measured by the loss at every position of ``--examples`` held-out windows of
   ``l0``, ``s l0`` and ``2 s l0`` tokens (``longctx.evals.perplexity.position_loss``), and
   passkey retrieval in held-out text (``longctx.evals.passkey_text``) at ``l0`` and
   ``s l0``, at ``--depths``. ``--passkey-share P`` writes passkey pairs into a share ``P``
   of the training rows (:func:`mix_passkeys`); off by default: at this scale even
   ``P = 0.5`` (a 4-head model, 500 steps) left retrieval at chance at ``l0``.

Outputs in ``--out`` (written when complete: each file into a temporary name, then renamed;
``results.partial.jsonl`` grows while it runs and is removed at the end):
``results.jsonl`` (a row per seed x method x factor x phase x length: ``loss`` nats/token
over the window, ``bpb`` bits/byte on the byte corpus, ``loss_head`` / ``loss_tail`` over
positions below / from ``l0``, ``curve`` = loss per log-spaced position bucket, ``passkey``
= exact match averaged over depths, ``passkey_by_depth``, ``passkey_accuracy`` per answer
token), ``results.md`` (mean +- std over seeds) and ``extend_context.png`` (loss by position,
a line per method, ``l0`` and ``s l0`` marked; a panel per factor and phase). The base and
fine-tuned runs are kept under ``--out/runs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from experiments.context_sweep import train_run
from experiments.perplexity_by_position import build_corpus
from longctx.config import load_config
from longctx.data.ruler_text import tokenizer_encoder
from longctx.evals.core import load_model
from longctx.data.ruler_text import encode_bytes
from longctx.evals.passkey_text import ANSWER, NEEDLE, QUESTION, passkey_text_eval, template_len
from longctx.evals.perplexity import buckets, load_tokens, position_loss
from longctx.inherit.__main__ import main as inherit_main
from longctx.train.loop import train

# A small Llama: byte vocabulary, 2 query heads of 32 (1 kv head), no short q/k/v convolution (it would give
# the model relative positions outside RoPE).
BASE = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=1", "model.mlp_dim=192", "model.attention.conv_size=0",
        "data.source=tokens", "data.token_dtype=uint16", "optim.lr=3e-3",
        "optim.weight_decay=0.0", "train.log_every=50"]
METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")
PHASES = ("zero_shot", "finetuned")


def scaling(method: str, factor: float, l0: int) -> str:
    """The ``model.rope_scaling`` override of ``method`` at ``factor`` (pre-training length l0)."""
    if method not in METHODS:
        raise ValueError(f"extend_context: unknown method {method!r}; expected one of {METHODS}")
    if method == "none":
        return "model.rope_scaling={type: none}"
    if method in ("linear", "ntk"):
        return f"model.rope_scaling={{type: {method}, factor: {factor:g}}}"
    return (f"model.rope_scaling={{type: {method}, factor: {factor:g}, "
            f"original_max_position_embeddings: {l0}}}")


def mix_passkeys(tokens, *, row_len: int, share: float, seed: int = 0):
    """The byte stream ``tokens`` with passkey pairs written in: ``share`` of its rows of
    ``row_len`` ids (the trainer's rows at ``data.seq_len = row_len``) hold ``NEEDLE``, then
    some text, then ``QUESTION ANSWER`` (``longctx.evals.passkey_text``'s phrases, a fresh
    5-digit key each), at a random place in the row; the other rows are the text as it is.

    A model trained on text alone retrieves a passkey only if pretraining taught it to
    copy from context; with each pair inside one trained row that skill is taught at short
    range only, and whether it reaches across the extended window is up to the RoPE
    scaling. (The default run leaves it off: at its scale retrieval stayed at chance.)
    """
    if not 0 < share < 1:
        raise ValueError(f"mix_passkeys: {share=} must be in (0, 1)")
    room = row_len - template_len()  # text ids in a row that holds a pair
    if room < 0:
        raise ValueError(f"mix_passkeys: {row_len=} cannot hold the passkey phrases "
                         f"({template_len()} ids)")
    rng = np.random.default_rng([seed, 3000])
    out, pos, n = [], 0, len(tokens)
    while pos + row_len <= n:
        if rng.random() >= share:
            out.append(np.asarray(tokens[pos:pos + row_len], np.int64))
            pos += row_len
            continue
        key = "".join(str(d) for d in rng.integers(0, 10, size=5))
        gap = int(rng.integers(0, room + 1))  # text between the needle and the question
        before = int(rng.integers(0, room - gap + 1))
        cut = [pos, pos + before, pos + before + gap, pos + room]
        out += [tokens[cut[0]:cut[1]], encode_bytes(NEEDLE.format(key=key)),
                tokens[cut[1]:cut[2]], encode_bytes(QUESTION + ANSWER.format(key=key)),
                tokens[cut[2]:cut[3]]]
        pos += room
    return np.concatenate([np.asarray(o, np.int64) for o in out])


def _write_atomic(path: str, write) -> None:
    """``write(file)`` into ``path.tmp``, renamed to ``path`` when complete."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        write(f)
    os.replace(tmp, path)


def evaluate(model, heldout, *, l0, factor, examples, depths, vocab_size, seed, encode,
             byte_level, lengths=None):
    """Rows ``{length, loss, bpb, loss_head, loss_tail, curve, passkey...}``: perplexity by
    position at ``l0, s l0, 2 s l0`` and passkey retrieval at ``l0`` and ``s l0`` (at ``l0``
    only when the passkey's text leaves 16 ids of haystack there)."""
    lengths = lengths or [l0, int(factor * l0), int(2 * factor * l0)]
    rows = []
    for L in lengths:
        per_pos = position_loss(model, heldout, length=L, examples=examples,
                                vocab_size=vocab_size)  # float64 [L], nats
        edges = buckets(L, split=l0)
        row = {"length": L, "loss": float(per_pos.mean()),
               "bpb": float(per_pos.mean() / math.log(2)) if byte_level else None,
               "loss_head": float(per_pos[:l0].mean()),
               "loss_tail": float(per_pos[l0:].mean()) if L > l0 else None,
               "curve": [[lo, hi, float(per_pos[lo:hi].mean())] for lo, hi in edges],
               "passkey": None, "passkey_accuracy": None, "passkey_logprob": None,
               "passkey_by_depth": None}
        # passkey at l0 and s l0, where the needle leaves >= 16 ids of haystack
        if L <= factor * l0 and depths and L >= template_len(encode) + 16:
            pk = passkey_text_eval(model, heldout, lengths=[L], depths=depths,
                                   examples=examples, vocab_size=vocab_size, seed=seed,
                                   encode=encode)
            row.update(passkey=float(np.mean([r["exact_match"] for r in pk])),
                       passkey_accuracy=float(np.mean([r["accuracy"] for r in pk])),
                       passkey_logprob=float(np.mean([r["answer_logprob"] for r in pk])),
                       passkey_by_depth={f"{r['depth']:g}": r["exact_match"] for r in pk})
        rows.append(row)
    return rows


def _fmt(vals, digits=3):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    v = np.asarray(vals, np.float64)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def summarise(rows) -> str:
    """Markdown: mean ± std (population, over seeds) per method x factor x phase."""
    meta = rows[0]
    unit = "bits/byte" if meta.get("bpb") is not None else "nats/token"
    key = "bpb" if unit == "bits/byte" else "loss"
    l0 = meta["l0"]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Trained at l0 = {l0} tokens for {meta['pretrain_tokens']} tokens; fine-tune "
             f"{meta['ft_tokens']} tokens at s·l0 (ft / pretraining = "
             f"{meta['ft_fraction']:.3f}); {len(seeds)} seeds, mean ± std. Loss in {unit} over "
             f"the whole window; passkey = exact match of the 5 digits, mean over depths; answer log p = "
             f"mean log-probability of the answer's ids (chance for a digit: {-math.log(10):.2f})."
             , ""]
    for s in sorted({r["factor"] for r in rows}):
        L1, L2 = int(s * l0), int(2 * s * l0)
        lines += [f"**factor s = {s:g}** (s·l0 = {L1}, 2s·l0 = {L2})", "",
                  f"| method | phase | loss @ {l0} | loss @ {L1} | loss @ {L2} | "
                  f"loss beyond {l0} @ {L2} | passkey @ {l0} | passkey @ {L1} | "
                  f"answer log p @ {L1} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in [m for m in METHODS if any(r["method"] == m for r in rows)]:
            for ph in PHASES:
                sel = [r for r in rows if r["method"] == m and r["factor"] == s
                       and r["phase"] == ph]
                if not sel:
                    continue

                def at(L, k):
                    return [r[k] for r in sel if r["length"] == L]
                tail = [t / math.log(2) if key == "bpb" and t is not None else t
                        for t in at(L2, "loss_tail")]
                lines.append(f"| {m} | {ph} | {_fmt(at(l0, key))} | {_fmt(at(L1, key))} | "
                             f"{_fmt(at(L2, key))} | {_fmt(tail)} | "
                             f"{_fmt(at(l0, 'passkey'), 2)} | {_fmt(at(L1, 'passkey'), 2)} | "
                             f"{_fmt(at(L1, 'passkey_logprob'), 2)} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib  # noqa: PLC0415 - optional output, no display needed

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    l0, factors = rows[0]["l0"], sorted({r["factor"] for r in rows})
    key_unit = ("bits / byte", math.log(2)) if rows[0].get("bpb") is not None else \
        ("nats / token", 1.0)
    fig, axes = plt.subplots(len(PHASES), len(factors), figsize=(5.2 * len(factors), 7),
                             squeeze=False, sharey=True)
    for j, s in enumerate(factors):
        L = int(2 * s * l0)
        for i, ph in enumerate(PHASES):
            ax = axes[i][j]
            for k, m in enumerate(METHODS):
                sel = [r for r in rows if r["method"] == m and r["factor"] == s
                       and r["phase"] == ph and r["length"] == L]
                if not sel:
                    continue
                curve = np.mean([[c[2] for c in r["curve"]] for r in sel], 0) / key_unit[1]
                mid = [max((lo + hi) / 2, 0.5) for lo, hi, _ in sel[0]["curve"]]
                ax.plot(mid, curve, "o-", ms=3, color=f"C{k}", label=m)
            ax.axvline(l0, color="k", ls=":", lw=0.9, label=f"trained length {l0}")
            ax.axvline(s * l0, color="grey", ls="--", lw=0.7, label=f"s·l0 = {int(s * l0)}")
            ax.set_xscale("log", base=2)
            ax.set(title=f"s = {s:g}, {ph.replace('_', ' ')} (evaluated at {L})",
                   xlabel="position", ylabel=f"loss ({key_unit[0]})")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_outputs(rows, out):
    _write_atomic(os.path.join(out, "results.jsonl"),
                  lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))
    table = summarise(rows)
    _write_atomic(os.path.join(out, "results.md"), lambda f: f.write(table + "\n"))
    plot(rows, os.path.join(out, "extend_context.png"))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.extend_context",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/extend_context_exp")
    p.add_argument("--config", default="experiments/configs/tiny.yaml")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--factors", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--l0", type=int, default=128, help="pre-training length (tokens)")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--base-batch", type=int, default=16)
    p.add_argument("--ft-steps", type=int, default=20, help="fine-tune steps (every method)")
    p.add_argument("--ft-batch-tokens", type=int, default=4096,
                   help="fine-tune tokens per step: batch = this / (s * l0)")
    p.add_argument("--ft-lr", type=float, default=3e-4, help="the base run's final lr")
    p.add_argument("--examples", type=int, default=16, help="held-out windows per length "
                                                            "(and passkeys per depth)")
    p.add_argument("--depths", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--passkey-share", type=float, default=0.0,
                   help="share of the training rows (of l0 bytes) holding a passkey pair "
                        "(mix_passkeys; 0: plain text); the default corpus only")
    p.add_argument("--data", default=None, help="training tokens (prepared dir or .bin); "
                                                "default: the stdlib byte corpus")
    p.add_argument("--eval-data", default=None, help="held-out tokens (with --data)")
    p.add_argument("--tokenizer", default=None, help="the passkey's encoder (with --data; "
                                                     "default: UTF-8 bytes)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    p.add_argument("--from-results", metavar="JSONL",
                   help="train nothing: the table and plot of this results.jsonl")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.from_results:
        rows = [json.loads(line) for line in open(a.from_results)]
        print(write_outputs(rows, a.out))
        return rows
    if a.quick:
        a.base_steps, a.ft_steps, a.examples, a.depths = 4, 2, 2, [0.5]
        a.factors, a.seeds, a.ft_batch_tokens = [2.0], 1, 2048
        a.overrides = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                       "model.mlp_dim=64", "model.n_layers=1", *a.overrides]
    for s in a.factors:
        if s < 1 or s * a.l0 != int(s * a.l0):
            raise ValueError(f"--factors {s:g}: expected factors >= 1 with s * l0 "
                             f"(l0 = {a.l0}) a whole number of tokens")
    n_dev = jax.device_count()  # the trainer's data axis spans every device
    for s in a.factors:
        b = a.ft_batch_tokens // int(s * a.l0)
        if b < 1 or b % n_dev or a.base_batch % n_dev:
            raise ValueError(f"--ft-batch-tokens {a.ft_batch_tokens} / (s * l0 = {int(s * a.l0)})"
                             f" = {b} sequences and --base-batch {a.base_batch}: expected "
                             f"multiples of the {n_dev} devices")
    if a.eval_data and not a.data:
        raise ValueError("--eval-data needs --data (the default corpus brings its own)")
    t0 = time.time()
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # every seed (and every method's init and restore) compiles the same programs: JAX's
        # persistent cache compiles each once (a hit is the same executable: no result changes)
        jax.config.update("jax_compilation_cache_dir", os.path.join(a.out, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    # -- corpus ------------------------------------------------------------------------
    if a.data:
        train_path, eval_path = a.data, a.eval_data or a.data
        if not a.eval_data:
            print(f"warning: no --eval-data: evaluating on the training data {a.data}")
        byte_level = False
    else:
        corpus = os.path.join(a.out, "corpus")
        os.makedirs(corpus, exist_ok=True)
        paths = build_corpus(corpus, max_bytes=400_000 if a.quick else 4_000_000)
        train_path, eval_path, byte_level = paths["train"], paths["heldout"], True
        if a.passkey_share > 0:  # only the training split: held-out text stays as it is
            mixed = mix_passkeys(np.fromfile(train_path, np.uint16), row_len=a.l0,
                                 share=a.passkey_share)
            train_path = os.path.join(corpus, "train_passkeys.bin")
            mixed.astype(np.uint16).tofile(train_path + ".tmp")
            os.replace(train_path + ".tmp", train_path)
    encode = tokenizer_encoder(a.tokenizer) if a.tokenizer else None
    base_ov = [*BASE, f"data.path={train_path}", f"data.seq_len={a.l0}",
               f"train.batch_size={a.base_batch}", *a.overrides]
    cfg0 = load_config(a.config, base_ov)
    V = cfg0.model.vocab_size
    heldout = load_tokens(eval_path, dtype=cfg0.data.token_dtype, vocab_size=V)
    if a.data and not (a.tokenizer or V == 256):
        print("no --tokenizer for a non-byte vocabulary: passkey skipped")
        a.depths = []
    pretrain_tokens = a.base_steps * a.base_batch * a.l0
    ft_tokens = a.ft_steps * a.ft_batch_tokens
    meta = {"l0": a.l0, "pretrain_tokens": pretrain_tokens, "ft_tokens": ft_tokens,
            "ft_fraction": ft_tokens / pretrain_tokens, "ft_steps": a.ft_steps,
            "passkey_share": a.passkey_share if not a.data else 0.0}
    kw = dict(l0=a.l0, examples=a.examples, depths=a.depths, vocab_size=V, encode=encode,
              byte_level=byte_level, seed=cfg0.data.eval_seed)

    rows, partial = [], os.path.join(a.out, "results.partial.jsonl")
    with open(partial, "w") as log:
        def emit(**r):
            rows.append({**meta, **r})
            log.write(json.dumps(rows[-1]) + "\n")
            log.flush()

        for seed in range(a.seeds):
            # -- the base model: trained at l0 ---------------------------------------------
            base = train_run(a.config, base_ov, os.path.join(a.out, "runs", f"seed{seed}",
                                                             "base"),
                             steps=a.base_steps, seed=seed)
            print(f"seed {seed}: base trained ({time.time() - t0:.0f}s)", flush=True)
            cache = {}  # zero-shot "none" is one model at every factor: its rows are shared
            for s in a.factors:
                L_max = int(2 * s * a.l0)
                for m in a.methods:
                    # -- zero-shot: the base checkpoint with the method's RoPE -----------
                    ov = scaling(m, s, a.l0)
                    key = (ov if m != "none" else "none", s)
                    if key not in cache:
                        _, model, _ = load_model(base, [ov], max_len=L_max)
                        cache[key] = evaluate(model, heldout, factor=s, **kw)
                    for r in cache[key]:
                        emit(method=m, factor=s, phase="zero_shot", seed=seed, **r)
                    # -- fine-tuned: a child run by longctx.inherit, trained at s l0 -----
                    child = os.path.join(a.out, "runs", f"seed{seed}", f"{m}-s{s:g}")
                    L1 = int(s * a.l0)
                    inherit_main(["--parent", base, "--config", os.path.join(base, "config.yaml"),
                                  "--ratio", "1", "--method", "interpolate", "--run-dir", child,
                                  ov, f"data.seq_len={L1}",
                                  f"model.max_seq_len={max(L_max, cfg0.model.max_seq_len)}",
                                  f"train.steps={a.ft_steps}",
                                  f"train.batch_size={a.ft_batch_tokens // L1}",
                                  f"optim.lr={a.ft_lr}",
                                  f"optim.warmup_steps={max(1, a.ft_steps // 10)}",
                                  "checkpoint.resume=true"])
                    train(load_config(os.path.join(child, "config.yaml")), progress=False)
                    _, model, _ = load_model(child, max_len=L_max)
                    for r in evaluate(model, heldout, factor=s, **kw):
                        emit(method=m, factor=s, phase="finetuned", seed=seed, **r)
                    cur = [r for r in rows if r["method"] == m and r["factor"] == s
                           and r["seed"] == seed]
                    print(f"seed {seed} s={s:g} {m:7s} loss@{a.l0},{L1},{L_max}: zero-shot "
                          + " ".join(f"{r['loss']:.3f}" for r in cur[:3]) + " | fine-tuned "
                          + " ".join(f"{r['loss']:.3f}" for r in cur[3:])
                          + f" | passkey@{L1} {cur[1]['passkey']} -> {cur[4]['passkey']}"
                          f" ({time.time() - t0:.0f}s)", flush=True)
    table = write_outputs(rows, a.out)
    os.remove(partial)
    print(table)
    print(f"wrote {a.out}/results.jsonl, results.md, extend_context.png "
          f"({time.time() - t0:.0f}s)")
    return rows


if __name__ == "__main__":
    main()
