"""Tokenised data preparation: text / JSONL -> ``.bin`` token shards + ``meta.json``.

    python -m longctx.data.prepare --tokenizer TOK --input FILE [FILE ...] --out DIR \\
        [--eos TOKEN] [--text-field text] [--split-blank-lines] [--workers N]
    python -m longctx.train --config CFG data.source=tokens data.path=DIR

``TOK`` is a ``tokenizer.json`` file or a Hugging Face model directory holding one
(the ``tokenizers`` library; nothing is downloaded). Inputs:

* ``*.jsonl`` (and ``*.json``): one document per non-blank line, the string in
  ``--text-field``;
* any other file: UTF-8 text, one document per file; with ``--split-blank-lines``
  documents are separated by one or more blank (whitespace-only) lines, i.e. the
  regex ``\\n([ \\t\\r\\f\\v]*\\n)+``; the separator is dropped (with the line break
  that ends the file), everything else is kept verbatim, and whitespace-only pieces
  are skipped.

Each document is encoded without the tokenizer's special tokens
(``add_special_tokens=False``: no BOS) and followed by the EOS id, so the model
learns to end documents and :class:`longctx.data.sources.TokenBinSource` splits
them again after each EOS. EOS is ``--eos`` (a token string), else the
``eos_token`` of the model directory's ``tokenizer_config.json``; a token that the
tokenizer does not know is an error.

Output ``DIR``: ``tokens-00000.bin, ...`` (flat ``numpy.tofile`` arrays, uint16 when
the vocabulary fits in 65536 ids, else uint32; a document never straddles two
shards; at most ``--shard-tokens`` tokens a shard unless one document is longer)
and ``meta.json`` (dtype, vocab_size, eos_id, eos_token, num_tokens,
num_documents, the tokenizer's sha256, the inputs with their sizes, the shards).
Everything is written into ``DIR.tmp-XXXX`` (:func:`longctx.atomic.staged_dir`)
first and ``meta.json`` last; the
directory is renamed to ``DIR`` only when complete, so ``DIR`` never looks
finished when it is not (an error removes the temporary directory). ``DIR`` must
not exist yet (or be empty).

Parallel: the inputs are cut into work units (a whole text file, or about
``--chunk-bytes`` of a JSONL / blank-line-split file, cut at a document
boundary), tokenised by ``--workers`` processes and written in input order, so
the output is byte-identical whatever the number of workers. The progress bar
counts input bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import mmap
import multiprocessing
import os
import re
import sys

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from longctx.atomic import staged_dir

__all__ = ["prepare", "load_tokenizer", "resolve_eos", "split_documents", "main"]

FORMAT = "longctx.tokens/1"
META = "meta.json"
JSONL_SUFFIXES = (".jsonl", ".json")
BLANK_LINES = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")  # the --split-blank-lines separator
BLANK_LINES_STR = re.compile(BLANK_LINES.pattern.decode())


# ----------------------------------------------------------------------------
# Tokenizer and EOS
# ----------------------------------------------------------------------------


def _tokenizer_file(path: str) -> str:
    f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"tokenizer not found: {f!r} (expected a tokenizer.json file "
                                f"or a Hugging Face model directory holding one)")
    return f


def load_tokenizer(path: str):
    """``(tokenizers.Tokenizer, sha256 hex of its tokenizer.json)``."""
    f = _tokenizer_file(path)
    with open(f, "rb") as fh:
        data = fh.read()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 -- the library's own error type varies
        raise ValueError(f"tokenizer {f!r} could not be loaded: {e}") from None
    return tok, hashlib.sha256(data).hexdigest()


def resolve_eos(tokenizer, tokenizer_path: str, eos: str | None) -> tuple[str, int]:
    """``(eos token, its id)``: ``eos``, else the model directory's ``eos_token``."""
    if eos is None:
        cfg = os.path.join(tokenizer_path, "tokenizer_config.json")
        if os.path.isdir(tokenizer_path) and os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as fh:
                eos = json.load(fh).get("eos_token")
            if isinstance(eos, dict):  # {"content": "</s>", ...}
                eos = eos.get("content")
        if not eos:
            raise ValueError(f"no EOS token: pass --eos TOKEN (tokenizer {tokenizer_path!r} "
                             f"names no eos_token in a tokenizer_config.json)")
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
        raise ValueError(f"unknown EOS token {eos!r}: not in the vocabulary of tokenizer "
                         f"{tokenizer_path!r}")
    return eos, int(eos_id)


# ----------------------------------------------------------------------------
# Work units: (file, byte range) cut at document boundaries
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    path: str
    kind: str  # "jsonl" | "text" | "paragraphs"
    start: int  # byte range [start, stop) of the file
    stop: int
    first_line: int  # 1-based line number of byte `start`
    text_field: str = "text"  # jsonl
    at_eof: bool = True  # the unit ends the file


def _kind(path: str, split_blank_lines: bool) -> str:
    if path.lower().endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "paragraphs" if split_blank_lines else "text"


def _check_readable(path: str) -> int:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input not found or not a file: {path!r}")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as e:
        raise OSError(f"input {path!r} is not readable: {e.strerror}") from None
    return os.path.getsize(path)


def _units(path: str, kind: str, size: int, chunk_bytes: int, text_field: str) -> list[Unit]:
    """Cut ``path`` into units of about ``chunk_bytes`` ending at a document boundary."""
    if kind == "text" or size <= chunk_bytes:
        return [Unit(path, kind, 0, size, 1, text_field)]
    units, start, line = [], 0, 1
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        while start < size:
            target = start + chunk_bytes
            if target >= size:
                stop = size
            elif kind == "jsonl":
                nl = mm.find(b"\n", target)
                stop = size if nl < 0 else nl + 1
            else:  # the separator run that reaches past `target` ends the unit (greedy)
                m = BLANK_LINES.search(mm, target - 1)
                stop = size if m is None else m.end()
            units.append(Unit(path, kind, start, stop, line, text_field, stop == size))
            line += mm[start:stop].count(b"\n")
            start = stop
    return units


def split_documents(data: bytes, unit: Unit) -> list[str]:
    """The documents (str) of one unit's bytes; errors name the file (and line / byte)."""
    if unit.kind == "jsonl":
        docs = []
        for k, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            where = f"{unit.path}:{unit.first_line + k}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: not a JSON line ({e})") from None
            text = obj.get(unit.text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{where}: expected a JSON object with a string field "
                                 f"{unit.text_field!r} (--text-field)")
            docs.append(text)
        return docs
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{unit.path}: not UTF-8 text (byte {unit.start + e.start}: "
                         f"{e.reason})") from None
    if unit.kind == "text":
        return [text] if text else []
    if unit.at_eof and text.endswith("\n"):  # the last line's terminator, like a separator's
        text = text[:-1]
    return [p for p in BLANK_LINES_STR.split(text) if p.strip()]


# ----------------------------------------------------------------------------
# Tokenising one unit (in a worker or in-process)
# ----------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, eos_id: int, dtype: str) -> None:
    tok, _ = load_tokenizer(tokenizer_path)
    _WORKER.update(tok=tok, eos_id=eos_id, dtype=np.dtype(dtype))


def _encode_unit(unit: Unit) -> tuple[np.ndarray, np.ndarray, int]:
    """``(ids [n] with EOS after each document, document end offsets [docs], bytes read)``."""
    with open(unit.path, "rb") as fh:
        fh.seek(unit.start)
        data = fh.read(unit.stop - unit.start)
    docs = split_documents(data, unit)
    tok, eos, dt = _WORKER["tok"], _WORKER["eos_id"], _WORKER["dtype"]
    encs = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)] if docs else []
    ends = np.cumsum([len(e) + 1 for e in encs], dtype=np.int64)
    eos_arr = np.asarray([eos], dt)
    ids = np.concatenate([a for e in encs for a in (np.asarray(e, dt), eos_arr)] or [eos_arr[:0]])
    return ids, ends, unit.stop - unit.start


# ----------------------------------------------------------------------------
# The whole preparation
# ----------------------------------------------------------------------------


class _ShardWriter:
    """Appends documents in order to shards of at most ``cap`` tokens (a longer document
    gets a shard of its own); a document never straddles two shards."""

    def __init__(self, directory: str, cap: int):
        self.dir, self.cap = directory, cap
        self.shards: list[dict] = []
        self._fh = None

    def _new_shard(self):
        self.close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self._fh = open(os.path.join(self.dir, name), "wb")
        self.shards.append({"file": name, "num_tokens": 0, "num_documents": 0})

    def write(self, ids: np.ndarray, ends: np.ndarray) -> None:
        """``ids`` [n]: documents back to back; ``ends`` [docs]: where each one ends."""
        i, start = 0, 0
        while i < len(ends):
            if self._fh is None:
                self._new_shard()
            sh = self.shards[-1]
            # the last document j >= i that still fits in this shard
            j = int(np.searchsorted(ends, start + self.cap - sh["num_tokens"], side="right")) - 1
            if j < i:
                if sh["num_tokens"]:  # document i does not fit: next shard
                    self._new_shard()
                    continue
                j = i  # longer than a whole shard: alone in one
            ids[start:ends[j]].tofile(self._fh)
            sh["num_tokens"] += int(ends[j]) - start
            sh["num_documents"] += j - i + 1
            i, start = j + 1, int(ends[j])

    def close(self):
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def prepare(tokenizer: str, inputs, out: str, *, eos: str | None = None,
            text_field: str = "text", split_blank_lines: bool = False, workers: int = 1,
            chunk_bytes: int = 16 << 20, shard_tokens: int = 1 << 28,
            progress: bool = True) -> dict:
    """Tokenise ``inputs`` into ``out`` (see the module docstring); returns the meta dict."""
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike))
                                     else inputs)]
    if not inputs:
        raise ValueError("no --input files given")
    if workers < 1 or chunk_bytes < 1 or shard_tokens < 1:
        raise ValueError(f"{workers=}, {chunk_bytes=} and {shard_tokens=} must be >= 1")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out!r} exists and is not an empty directory")
    tok, tok_hash = load_tokenizer(tokenizer)
    eos_token, eos_id = resolve_eos(tok, tokenizer, eos)
    vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    sizes = [_check_readable(p) for p in inputs]  # every input, before any work
    units = [u for p, s in zip(inputs, sizes)
             for u in _units(p, _kind(p, split_blank_lines), s, chunk_bytes, text_field)]
    workers = min(workers, len(units))  # no more processes than work units (1: in-process)

    with staged_dir(out) as tmp:
        writer = _ShardWriter(tmp, shard_tokens)
        n_docs = 0
        init = (_tokenizer_file(tokenizer), eos_id, dtype)
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="prepare", disable=not progress, dynamic_ncols=True) as bar:
            if workers == 1:
                _init_worker(*init)
                results = map(_encode_unit, units)
                pool = None
            else:  # spawn: no fork of a process that may hold threads (tokenizers, jax)
                pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(
                    "spawn"), initializer=_init_worker, initargs=init)
                results = pool.map(_encode_unit, units)  # in unit order: deterministic
            try:
                for ids, ends, nbytes in results:
                    writer.write(ids, ends)
                    n_docs += len(ends)
                    bar.update(nbytes)
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        writer.close()
        meta = {
            "format": FORMAT, "dtype": dtype, "vocab_size": vocab_size, "eos_id": eos_id,
            "eos_token": eos_token,
            "num_tokens": int(sum(s["num_tokens"] for s in writer.shards)),
            "num_documents": n_docs,
            "tokenizer": {"path": os.path.abspath(_tokenizer_file(tokenizer)),
                          "sha256": tok_hash},
            "inputs": [{"path": os.path.abspath(p), "bytes": s} for p, s in zip(inputs, sizes)],
            "text_field": text_field, "split_blank_lines": bool(split_blank_lines),
            "add_special_tokens": False,
            "shards": writer.shards,
        }
        with open(os.path.join(tmp, META + ".tmp"), "w") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(os.path.join(tmp, META + ".tmp"), os.path.join(tmp, META))  # last
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longctx.data.prepare",
                                description="Tokenise text / JSONL into .bin shards + meta.json.")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a HF model directory")
    p.add_argument("--input", required=True, nargs="+", help="text files and/or .jsonl files")
    p.add_argument("--out", required=True, help="output directory (must not exist yet)")
    p.add_argument("--eos", default=None, help="EOS token (default: the model dir's eos_token)")
    p.add_argument("--text-field", default="text", help="JSONL: the field holding the text")
    p.add_argument("--split-blank-lines", action="store_true",
                   help="text files: documents separated by blank lines (default: one per file)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--chunk-bytes", type=int, default=16 << 20, help="bytes per work unit")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard (max)")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.tokenizer, args.input, args.out, eos=args.eos,
                       text_field=args.text_field, split_blank_lines=args.split_blank_lines,
                       workers=args.workers, chunk_bytes=args.chunk_bytes,
                       shard_tokens=args.shard_tokens)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {meta['num_documents']} documents, {meta['num_tokens']} tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}, eos {meta['eos_token']!r}="
          f"{meta['eos_id']}) in {len(meta['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
