"""The input pipeline: packed LM rows, sharded shuffled batches, resumable iterators.

    source = build_source("tokens", seq_len=4096, vocab_size=50304,
                          path="data/train.bin", dtype="uint16", eos_id=50256)
    ds = make_dataset(source, global_batch_size=256, seed=0,
                      process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(ds)
    batch = next(it)             # dict of numpy arrays [256 // process_count, 4096]
    state = iterator_state(it)   # JSON-able dict; store it with the checkpoint
    it = restore_iterator(ds, state)  # continues with exactly the same batches

Batches are dicts of numpy arrays, leading dim = this process's share of the
global batch:

* ``tokens``, ``targets`` int32 [B, T]; ``loss_mask`` float32 [B, T];
* ``segment_ids`` int32 [B, T] for packed documents (1-based document index
  within the row; the model must not attend across ids);
* whatever else an example source returns (``depth`` [B] for passkey).

**The global stream.** The source's rows are (optionally) shuffled with grain's
deterministic ``MapDataset.shuffle(seed)``, reshuffled each epoch, and repeated
``num_epochs`` times (None: forever). Global step ``s`` is rows
``s*G .. s*G + G - 1`` of that stream (``G = global_batch_size``); without
shuffling, step ``s`` of a `SyntheticSource` is exactly
``synthetic.make_batch(start_index=s*G, batch_size=G)``.

**Process shards.** Process ``p`` of ``P`` gets the *contiguous block*
``s*G + p*L .. s*G + (p+1)*L - 1`` with ``L = G // P``, so concatenating the
processes' local batches in process order gives the global batch. This is the
layout ``jax.make_array_from_process_local_data`` assembles for a batch axis
laid out over processes in order (data-parallel mesh over
``jax.devices()``), and each process reads only its own rows.

**State.** An iterator's state is the global step it will produce next (plus
a description of the stream, checked on restore). It does not depend on
``process_index`` / ``process_count``: a state saved by any process, under any
process count, restores every process of a run with a different count to the
same global step (elastic restarts), as long as the stream (source length,
batch size, seed, shuffle, epochs) is the same.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain
import numpy as np

from longctx.data.sources import (
    ByteTextSource,
    DocumentSource,
    JsonlSource,
    PreparedTokenSource,
    SyntheticSource,
    TokenBinSource,
    check_token_ids,
)

__all__ = [
    "PackedLMSource",
    "make_dataset",
    "iterator_state",
    "restore_iterator",
    "SOURCES",
    "build_source",
    "DEFAULT_READ_OPTIONS",
]


# ----------------------------------------------------------------------------
# Packing documents into LM rows
# ----------------------------------------------------------------------------


class PackedLMSource:
    """Documents packed into rows of ``seq_len`` tokens for next-token LM training.

    Conceptually all documents are concatenated in index order into one
    stream; row ``r`` holds stream tokens ``r*T .. r*T + T - 1``:

    * ``targets[t]`` = the next stream token when it belongs to the same
      document (for the last position it is the first token of row ``r+1``),
      else 0 with ``loss_mask[t] = 0`` (document ends, stream end);
    * ``segment_ids[t]`` = 1-based index, within the row, of the document that
      token ``t`` belongs to. A document cut by a row boundary continues as
      segment 1 of the next row; its loss is unaffected (its tokens still
      predict their true successors).

    Empty documents take no space. ``drop_remainder=True`` drops the final
    partial row; ``False`` keeps it, padded with token 0, segment id 0 and
    loss_mask 0.

    Row ``r`` is found by binary search over cumulative document lengths, so
    any row is read directly (deterministic and resumable), touching only the
    ``T + 1`` tokens it needs. Every id read is checked against
    ``vocab_size`` (the error names the id, the vocab size and its location).

    ``doc_source``: a `DocumentSource`, or any sequence of 1-D integer arrays
    (then ``lengths`` are computed by reading every document once).
    """

    def __init__(self, doc_source, *, seq_len: int, vocab_size: int, drop_remainder: bool = True):
        if seq_len < 1:
            raise ValueError(f"PackedLMSource: {seq_len=} must be >= 1")
        if not 1 <= vocab_size <= np.iinfo(np.int32).max:
            raise ValueError(f"PackedLMSource: {vocab_size=} must be in [1, 2**31 - 1]")
        self.docs, self.seq_len, self.vocab_size = doc_source, int(seq_len), int(vocab_size)
        self.drop_remainder = bool(drop_remainder)
        lengths = getattr(doc_source, "lengths", None)
        if lengths is None:
            lengths = [len(doc_source[i]) for i in range(len(doc_source))]
        lengths = np.asarray(lengths, dtype=np.int64)
        # cum[d] = stream offset of document d's first token; cum[-1] = total tokens.
        self._cum = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._cum[1:])
        self.num_tokens = int(self._cum[-1])
        T = self.seq_len
        self.num_rows = self.num_tokens // T if drop_remainder else -(-self.num_tokens // T)
        if self.num_rows == 0:
            raise ValueError(f"PackedLMSource: {self.num_tokens} tokens in {len(lengths)} documents "
                             f"of {doc_source!r} make no full row of {seq_len=}")

    def __len__(self) -> int:
        return self.num_rows

    def _read(self, d: int, start: int, stop: int) -> np.ndarray:
        read = getattr(self.docs, "read", None)
        ids = read(d, start, stop) if read is not None else np.asarray(self.docs[d])[start:stop]
        loc = getattr(self.docs, "location", None)
        where = ((lambda k: loc(d, start + k)) if loc is not None
                 else (lambda k: f"document {d} token {start + k}"))
        check_token_ids(ids, self.vocab_size, where)  # before the int32 cast
        return ids.astype(np.int32)

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        r = int(r)
        if not 0 <= r < self.num_rows:
            raise IndexError(f"PackedLMSource: row {r} out of range [0, {self.num_rows})")
        T, cum = self.seq_len, self._cum
        lo = r * T
        hi = min(lo + T + 1, self.num_tokens)  # one extra token: the last target
        buf = np.zeros(hi - lo, dtype=np.int32)
        doc = np.empty(hi - lo, dtype=np.int64)  # global document index per stream token
        d = int(np.searchsorted(cum, lo, side="right")) - 1  # last doc starting at or before lo
        while d < len(cum) - 1 and cum[d] < hi:
            a, b = max(lo, int(cum[d])), min(hi, int(cum[d + 1]))
            if b > a:
                buf[a - lo:b - lo] = self._read(d, a - int(cum[d]), b - int(cum[d]))
                doc[a - lo:b - lo] = d
            d += 1
        n = min(T, hi - lo)  # real tokens in this row (< T only for the kept remainder)
        tokens = np.zeros(T, dtype=np.int32)
        targets = np.zeros(T, dtype=np.int32)
        loss_mask = np.zeros(T, dtype=np.float32)
        segment_ids = np.zeros(T, dtype=np.int32)
        tokens[:n] = buf[:n]
        m = len(buf) - 1  # positions that have a next stream token
        same = doc[1:] == doc[:-1]  # [m]
        targets[:m] = np.where(same, buf[1:], 0)
        loss_mask[:m] = same
        segment_ids[0] = 1
        segment_ids[1:n] = 1 + np.cumsum(doc[1:n] != doc[:n - 1])
        return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
                "segment_ids": segment_ids}

    def __repr__(self) -> str:
        return (f"PackedLMSource({self.docs!r}, seq_len={self.seq_len}, "
                f"vocab_size={self.vocab_size}, drop_remainder={self.drop_remainder})")


# ----------------------------------------------------------------------------
# Batched, sharded, shuffled, resumable dataset
# ----------------------------------------------------------------------------

# Each element is a whole local batch, so a few threads and a short buffer
# suffice; grain's defaults (16 threads, 500 elements) would hold 500 batches.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class _ResumableIterDataset(grain.IterDataset):
    """Wraps the grain pipeline so the iterator state names the stream it belongs to."""

    def __init__(self, parent: grain.IterDataset, stream: dict[str, Any]):
        super().__init__(parent)
        self.stream = stream

    def __iter__(self) -> _ResumableIterator:
        return _ResumableIterator(self._parent.__iter__(), self.stream)

    def __str__(self) -> str:
        return f"LongctxPipeline({self.stream})"


class _ResumableIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, stream: dict[str, Any]):
        super().__init__(parent)
        self._stream = stream

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        # grain's state of the sliced dataset is {"next_index": step}: element j
        # of every process's dataset is global step j.
        return {"step": int(self._parent.get_state()["next_index"]), "stream": dict(self._stream)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("stream")
        if saved != self._stream:
            diff = {k: (saved.get(k) if saved else None, self._stream.get(k))
                    for k in sorted(set(self._stream) | set(saved or {}))
                    if (saved or {}).get(k) != self._stream.get(k)}
            raise ValueError(f"iterator state belongs to another data stream; "
                             f"(saved, this) differ in {diff}")
        self._parent.set_state({"next_index": int(state["step"])})


def make_dataset(source, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """This process's batches of ``source`` (see the module docstring for the layout).

    ``source``: any random-access source of fixed-shape example dicts
    (`SyntheticSource`, `PackedLMSource`, ...). Returns a ``grain.IterDataset``;
    ``iter()`` of it yields dicts of numpy arrays with leading dim
    ``global_batch_size // process_count`` and has ``get_state()`` /
    ``set_state()``. ``num_epochs=None`` repeats forever; otherwise iteration
    stops after the last *full* global batch.
    """
    G, P, p = int(global_batch_size), int(process_count), int(process_index)
    if G < 1 or P < 1:
        raise ValueError(f"make_dataset: {global_batch_size=} and {process_count=} must be >= 1")
    if G % P:
        raise ValueError(f"make_dataset: {global_batch_size=} is not divisible by {process_count=}")
    if not 0 <= p < P:
        raise ValueError(f"make_dataset: {process_index=} must be in [0, process_count) "
                         f"with {process_count=}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"make_dataset: {seed=} must be in [0, 2**32)")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"make_dataset: {num_epochs=} must be >= 1 or None (forever)")
    N, L = len(source), G // P

    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # reshuffled each epoch by repeat()
    ds = ds.repeat(num_epochs)
    ds = ds.batch(L, drop_remainder=True)  # local batch b = rows b*L .. b*L + L - 1
    if num_epochs is not None:
        steps = N * num_epochs // G
        if steps == 0:
            raise ValueError(f"make_dataset: {N} rows x {num_epochs=} make no full batch of "
                             f"{global_batch_size=}")
        ds = ds[:steps * P]  # whole global batches only: every process gets the same step count
    ds = ds[p::P]  # global step s = local batches s*P .. s*P + P - 1; this process takes the p-th
    stream = {"source": type(source).__name__, "num_rows": N, "global_batch_size": G,
              "seed": int(seed), "shuffle": bool(shuffle), "num_epochs": num_epochs}
    return _ResumableIterDataset(ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS), stream)


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's state as a JSON-able dict (``{"step": s, "stream": {...}}``)."""
    state = it.get_state()
    return json.loads(json.dumps(state))  # a detached copy; fails loudly if not JSON-able


def restore_iterator(ds: grain.IterDataset, state: Mapping[str, Any] | str | bytes) -> grain.DatasetIterator:
    """A fresh iterator of ``ds`` positioned at ``state`` (a dict or its JSON text)."""
    if isinstance(state, (str, bytes)):
        state = json.loads(state)
    it = iter(ds)
    it.set_state(state)
    return it


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

SOURCES: dict[str, type] = {
    "synthetic": SyntheticSource,
    "text": ByteTextSource,
    "jsonl": JsonlSource,
    "tokens": TokenBinSource,
}


def build_source(kind: str, *, seq_len: int, vocab_size: int, drop_remainder: bool = True,
                 **kwargs):
    """``SOURCES[kind](**kwargs)``, document sources wrapped in `PackedLMSource`.

    ``build_source("synthetic", seq_len=, vocab_size=, task="mqar", seed=0, num_kv_pairs=4)``
    ``build_source("text", seq_len=, vocab_size=, paths=[...], separator="\\n\\n")``
    ``build_source("jsonl", seq_len=, vocab_size=, path=..., text_field="text")``
    ``build_source("tokens", seq_len=, vocab_size=, path=..., dtype="uint16", eos_id=None)``
    ``build_source("tokens", seq_len=, vocab_size=, path=DIR)``: a directory made by
    ``python -m longctx.data.prepare`` (`PreparedTokenSource`; dtype and eos_id from its
    ``meta.json``, ``vocab_size`` checked against it)
    """
    if kind not in SOURCES:
        raise ValueError(f"build_source: unknown {kind=}; registered kinds: {sorted(SOURCES)}")
    cls = SOURCES[kind]
    if kind == "tokens" and os.path.isdir(os.fspath(kwargs.get("path", ""))):
        cls = PreparedTokenSource
        kwargs = {"path": kwargs["path"], "eos_id": kwargs.get("eos_id"), "vocab_size": vocab_size}
    if issubclass(cls, DocumentSource):
        # Ids are checked by the packer, which knows each document's location.
        return PackedLMSource(cls(**kwargs), seq_len=seq_len, vocab_size=vocab_size,
                              drop_remainder=drop_remainder)
    return cls(seq_len=seq_len, vocab_size=vocab_size, **kwargs)

