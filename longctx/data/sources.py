"""Random-access data sources: synthetic examples and tokenised documents.

Two kinds of source, both random access (``__len__`` and ``__getitem__``, the
protocol of ``grain.sources.RandomAccessDataSource``), so any item can be read
on any host in any order -- what sharded loading and exact resumption need:

* **example sources** return a finished training example, a dict of
  ``tokens``/``targets`` int32 [T] and ``loss_mask`` float32 [T]
  (`SyntheticSource`);
* **document sources** (`DocumentSource` subclasses) return one document, a
  1-D integer array of token ids of any length, in the dtype it is stored in
  (uint8 for bytes, uint16/uint32 for ``.bin`` files). They are packed into
  fixed-length training rows by ``longctx.data.pipeline.PackedLMSource``.

Every document source also exposes, for the packer:

* ``lengths``: int64 [num_docs], each document's length in tokens, known
  without reading the documents (file sizes, a scan at construction);
* ``read(i, start, stop)``: tokens ``start:stop`` of document ``i`` (a long
  document is read one row-sized piece at a time, never whole);
* ``location(i, offset)``: where token ``offset`` of document ``i`` lives on
  disk (``path byte N``, ``path:line``, ``path token N``), for error messages.

Token ids are checked against ``vocab_size`` on access (the packer always
checks; a document source checks too when given ``vocab_size``): an id outside
``[0, vocab_size)`` raises ``ValueError`` naming the id, the vocab size and the
location. ``TokenBinSource.validate`` scans a whole file eagerly.

Byte-level tokenizer: token = byte value (0..255) of the UTF-8 encoding, so
``vocab_size >= 256`` holds every byte; `encode_bytes` / `decode_bytes`.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Sequence

import numpy as np

from longctx.data import synthetic

__all__ = [
    "BYTE_VOCAB_SIZE",
    "TOKEN_DTYPES",
    "encode_bytes",
    "decode_bytes",
    "check_token_ids",
    "SyntheticSource",
    "DocumentSource",
    "ByteTextSource",
    "JsonlSource",
    "TokenBinSource",
    "PreparedTokenSource",
]

BYTE_VOCAB_SIZE = 256  # byte-level tokenizer: ids 0..255
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}  # .bin token files
_MAX_VOCAB = np.iinfo(np.int32).max  # ids are fed to the model as int32


# ----------------------------------------------------------------------------
# Byte tokenizer and id checks
# ----------------------------------------------------------------------------


def encode_bytes(text: str) -> np.ndarray:
    """``str`` -> uint8 [n]: the UTF-8 bytes of ``text``, one token per byte."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode_bytes(tokens) -> str:
    """Inverse of `encode_bytes`; invalid UTF-8 (e.g. a cut multi-byte char) -> U+FFFD."""
    ids = np.asarray(tokens)
    if ids.size and (ids.min() < 0 or ids.max() >= BYTE_VOCAB_SIZE):
        bad = ids[(ids < 0) | (ids >= BYTE_VOCAB_SIZE)][0]
        raise ValueError(f"decode_bytes: token id {int(bad)} is not a byte (0..255)")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _check_vocab_size(vocab_size: int | None, who: str) -> None:
    if vocab_size is not None and not 1 <= int(vocab_size) <= _MAX_VOCAB:
        raise ValueError(f"{who}: {vocab_size=} must be in [1, {_MAX_VOCAB}] (int32 token ids)")


def check_token_ids(ids: np.ndarray, vocab_size: int, where) -> None:
    """Raise ``ValueError`` if any id of ``ids`` is outside ``[0, vocab_size)``.

    ``where(k)`` -> str describes the location of ``ids[k]`` (called only on
    failure, for the first bad id).
    """
    if ids.size == 0:
        return
    if int(ids.max()) < vocab_size and int(ids.min()) >= 0:
        return
    k = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
    raise ValueError(f"token id {int(ids[k])} out of range for vocab_size={vocab_size} "
                     f"(valid ids 0..{vocab_size - 1}) at {where(k)}")


def _missing(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"{what} not found", path)


# ----------------------------------------------------------------------------
# Synthetic examples
# ----------------------------------------------------------------------------


class SyntheticSource:
    """Example ``i`` = ``synthetic.TASKS[task](seed, i, seq_len=, vocab_size=, **task_kwargs)``.

    Returns ``tokens``/``targets`` int32 [T], ``loss_mask`` float32 [T] (and
    ``depth`` float32 [] for passkey). ``length`` only bounds the index range
    (the stream is a pure function of ``(seed, i)``; grain needs a length).
    """

    def __init__(self, task: str, *, seed: int, seq_len: int, vocab_size: int,
                 length: int = 2**31 - 1, **task_kwargs):
        if task not in synthetic.TASKS:
            raise ValueError(f"SyntheticSource: unknown {task=}; known tasks: {sorted(synthetic.TASKS)}")
        _check_vocab_size(vocab_size, "SyntheticSource")
        if length < 1:
            raise ValueError(f"SyntheticSource: {length=} must be >= 1")
        self.task, self.seed, self.seq_len, self.vocab_size = task, int(seed), int(seq_len), int(vocab_size)
        self.length = int(length)
        self.task_kwargs = dict(task_kwargs)
        self._fn = synthetic.TASKS[task]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(f"SyntheticSource: index {i} out of range [0, {self.length})")
        ex = self._fn(self.seed, i, seq_len=self.seq_len, vocab_size=self.vocab_size, **self.task_kwargs)
        for key in ("tokens", "targets"):
            check_token_ids(ex[key], self.vocab_size,
                            lambda k, key=key: f"synthetic task {self.task!r} seed={self.seed} "
                                               f"example {i} {key}[{k}]")
        return ex

    def __repr__(self) -> str:
        kw = "".join(f", {k}={v!r}" for k, v in self.task_kwargs.items())
        return (f"SyntheticSource({self.task!r}, seed={self.seed}, seq_len={self.seq_len}, "
                f"vocab_size={self.vocab_size}, length={self.length}{kw})")


# ----------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------


class DocumentSource:
    """Base of the document sources: ``lengths``, ``read``, ``location``.

    Subclasses set ``self.lengths`` (int64 [num_docs]) and ``self.vocab_size``
    (None: unchecked) and implement ``_read(i, start, stop)`` and
    ``location(i, offset)``.
    """

    lengths: np.ndarray
    vocab_size: int | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._index(i)
        return self.read(i, 0, int(self.lengths[i]))

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of document ``i``, 1-D, in the stored dtype."""
        i = self._index(i)
        n = int(self.lengths[i])
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{type(self).__name__}: {start=}, {stop=} out of range for "
                             f"document {i} of {n} tokens")
        ids = self._read(i, int(start), int(stop))
        if self.vocab_size is not None:
            check_token_ids(ids, self.vocab_size, lambda k: self.location(i, start + k))
        return ids

    def location(self, i: int, offset: int = 0) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, i: int, start: int, stop: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _index(self, i: int) -> int:
        n = len(self.lengths)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__}: document {i} out of range [0, {n})")
        return i

    # Open files / memmaps are per process: drop them when pickled (grain's
    # multiprocessing pickles the source into each worker).
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


def _as_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("ByteTextSource: no paths given")
    return out


class ByteTextSource(DocumentSource):
    """Raw UTF-8 text files, byte-level tokens (id = byte value, 0..255).

    ``separator=None``: one document per file. ``separator="\\n\\n"`` (any str
    or bytes): each file is split at every occurrence of the separator, the
    separator itself is dropped and empty pieces are skipped; no other
    whitespace is stripped (bytes are kept verbatim, so a document decodes to
    exactly the text between separators). Files are memory-mapped and read
    lazily; with a separator each file is scanned once at construction.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 separator: str | bytes | None = None, vocab_size: int | None = None):
        _check_vocab_size(vocab_size, "ByteTextSource")
        self.paths = _as_paths(paths)
        self.separator = separator.encode("utf-8") if isinstance(separator, str) else separator
        if self.separator is not None and not self.separator:
            raise ValueError("ByteTextSource: separator must be non-empty (or None: one document per file)")
        self.vocab_size = vocab_size
        files, starts, lengths = [], [], []
        for f, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise _missing(path, "text file")
            size = os.path.getsize(path)
            if self.separator is None:
                pieces = [(0, size)]
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
                pieces, pos = [], 0
                while pos <= size:
                    end = data.find(self.separator, pos)
                    end = size if end < 0 else end
                    if end > pos:
                        pieces.append((pos, end))
                    pos = end + len(self.separator)
            for a, b in pieces:
                files.append(f)
                starts.append(a)
                lengths.append(b - a)
        self._file = np.asarray(files, dtype=np.int32)
        self._start = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def _read(self, i: int, start: int, stop: int) -> np.ndarray:
        if stop == start:
            return np.zeros(0, dtype=np.uint8)
        f = int(self._file[i])
        mm = self._maps.get(f)
        if mm is None:
            mm = self._maps[f] = np.memmap(self.paths[f], dtype=np.uint8, mode="r")
        s = int(self._start[i])
        return np.array(mm[s + start:s + stop])

    def location(self, i: int, offset: int = 0) -> str:
        return f"{self.paths[int(self._file[i])]} byte {int(self._start[i]) + offset}"

    def __repr__(self) -> str:
        return f"ByteTextSource({self.paths!r}, separator={self.separator!r})"


class JsonlSource(DocumentSource):
    """JSON Lines: one document per non-blank line, the byte-level tokens of ``text_field``.

    The file is scanned once at construction (line offsets and each
    document's UTF-8 length, which packing needs), so a line that is not JSON,
    not an object, or lacks ``text_field`` (or holds a non-string) fails there
    with ``ValueError`` naming ``file:line``. Large corpora: pre-tokenise to a
    ``.bin`` file (`TokenBinSource`) instead.
    """

    def __init__(self, path: str | os.PathLike, text_field: str = "text", *,
                 vocab_size: int | None = None):
        _check_vocab_size(vocab_size, "JsonlSource")
        self.path, self.text_field, self.vocab_size = os.fspath(path), text_field, vocab_size
        if not os.path.isfile(self.path):
            raise _missing(self.path, "JSONL file")
        offsets, lines, lengths = [], [], []
        with open(self.path, "rb") as fh:
            pos = 0
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(lineno)
                    lengths.append(len(self._text(line, lineno)))
                pos += len(line)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._line = np.asarray(lines, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def _text(self, line: bytes, lineno: int) -> bytes:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8: {e.reason}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if self.text_field not in obj:
            raise ValueError(f"{where}: no field {self.text_field!r} "
                             f"(fields: {sorted(obj)}); set text_field=")
        text = obj[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {self.text_field!r} is {type(text).__name__}, expected a string")
        return text.encode("utf-8")

    def _read(self, i: int, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as fh:
            fh.seek(int(self._offset[i]))
            data = self._text(fh.readline(), int(self._line[i]))
        return np.frombuffer(data[start:stop], dtype=np.uint8).copy()

    def location(self, i: int, offset: int = 0) -> str:
        return f"{self.path}:{int(self._line[i])} (field {self.text_field!r}, byte {offset})"

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, text_field={self.text_field!r})"


class TokenBinSource(DocumentSource):
    """A pre-tokenised flat binary file of ``dtype`` ids (``numpy.tofile`` layout), memory-mapped.

    ``eos_id=None``: the whole file is one document (one token stream).
    ``eos_id=E``: documents end *after* each ``E`` -- the EOS token is the last
    token of the document it ends, so the model learns to predict it; tokens
    after the last ``E`` form a final document. The file is scanned once at
    construction (in chunks) to find the ``E`` positions.
    """

    def __init__(self, path: str | os.PathLike, dtype: str = "uint16", eos_id: int | None = None,
                 *, vocab_size: int | None = None, chunk_tokens: int = 1 << 24):
        _check_vocab_size(vocab_size, "TokenBinSource")
        self.path, self.vocab_size, self.eos_id = os.fspath(path), vocab_size, eos_id
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
        if name not in TOKEN_DTYPES:
            raise ValueError(f"TokenBinSource: unknown {dtype=}; expected one of {sorted(TOKEN_DTYPES)}")
        self.dtype = np.dtype(TOKEN_DTYPES[name])
        if not os.path.isfile(self.path):
            raise _missing(self.path, "token file")
        size = os.path.getsize(self.path)
        if size % self.dtype.itemsize:
            raise ValueError(f"corrupt token file {self.path!r}: size {size} bytes is not a multiple "
                             f"of {self.dtype.itemsize} (dtype {name}); truncated write?")
        self.num_tokens = size // self.dtype.itemsize
        self._maps: dict[int, np.ndarray] = {}
        if eos_id is None:
            ends = np.asarray([self.num_tokens] if self.num_tokens else [], dtype=np.int64)
        else:
            if not 0 <= int(eos_id) <= np.iinfo(self.dtype).max:
                raise ValueError(f"TokenBinSource: {eos_id=} does not fit dtype {name}")
            mm = self._mmap()
            found = [np.flatnonzero(mm[a:a + chunk_tokens] == eos_id) + a + 1
                     for a in range(0, self.num_tokens, chunk_tokens)]
            ends = np.concatenate(found + [np.zeros(0, np.int64)]).astype(np.int64)
            if self.num_tokens and (not ends.size or ends[-1] != self.num_tokens):
                ends = np.append(ends, self.num_tokens)
        self._start = np.concatenate([[0], ends[:-1]]).astype(np.int64) if ends.size else ends
        self.lengths = ends - self._start

    def _mmap(self) -> np.ndarray:
        mm = self._maps.get(0)
        if mm is None:
            if self.num_tokens == 0:
                return np.zeros(0, dtype=self.dtype)
            mm = self._maps[0] = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return mm

    def _read(self, i: int, start: int, stop: int) -> np.ndarray:
        s = int(self._start[i])
        return np.array(self._mmap()[s + start:s + stop])

    def location(self, i: int, offset: int = 0) -> str:
        return f"{self.path} token {int(self._start[i]) + offset} (document {i})"

    def validate(self, vocab_size: int, *, chunk_tokens: int = 1 << 24) -> int:
        """Scan the whole file (``chunk_tokens`` at a time); raise on the first id >= ``vocab_size``.

        Returns the number of tokens checked.
        """
        _check_vocab_size(vocab_size, "TokenBinSource.validate")
        mm = self._mmap()
        for a in range(0, self.num_tokens, chunk_tokens):
            check_token_ids(mm[a:a + chunk_tokens], vocab_size,
                            lambda k: f"{self.path} token {a + k}")
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenBinSource({self.path!r}, dtype={self.dtype.name!r}, eos_id={self.eos_id!r})"


class PreparedTokenSource(DocumentSource):
    """A directory written by ``python -m longctx.data.prepare``: its shards, in order.

    ``meta.json`` (written last by ``prepare``) gives the dtype, the EOS id and the
    shard list; a directory without it is not (completely) prepared and is refused,
    and so is a shard whose size disagrees with ``meta.json``. Documents end after
    each EOS (as in `TokenBinSource`); no document straddles two shards.
    ``vocab_size`` (the model's) must be at least the tokenizer's ``vocab_size``.
    """

    def __init__(self, path: str | os.PathLike, *, vocab_size: int | None = None,
                 eos_id: int | None = None):
        _check_vocab_size(vocab_size, "PreparedTokenSource")
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.isfile(meta_path):
            raise _missing(meta_path, "meta.json of a prepared token directory (incomplete "
                                      "or not made by python -m longctx.data.prepare)")
        with open(meta_path, encoding="utf-8") as fh:
            self.meta = meta = json.load(fh)
        if vocab_size is not None and int(vocab_size) < int(meta["vocab_size"]):
            raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                             f"vocab_size={meta['vocab_size']} of {meta_path}")
        if eos_id is not None and int(eos_id) != int(meta["eos_id"]):
            raise ValueError(f"data.eos_id={eos_id} disagrees with eos_id={meta['eos_id']} "
                             f"of {meta_path} (leave data.eos_id unset)")
        self.vocab_size, self.eos_id = vocab_size, int(meta["eos_id"])
        self.shards = [TokenBinSource(os.path.join(self.path, s["file"]), meta["dtype"],
                                      self.eos_id) for s in meta["shards"]]
        for src, s in zip(self.shards, meta["shards"]):
            if src.num_tokens != int(s["num_tokens"]):
                raise ValueError(f"corrupt prepared directory: {src.path} holds {src.num_tokens} "
                                 f"tokens, {meta_path} says {s['num_tokens']}")
        self.num_tokens = sum(src.num_tokens for src in self.shards)
        counts = [len(src) for src in self.shards]
        self._shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.lengths = (np.concatenate([src.lengths for src in self.shards]).astype(np.int64)
                        if self.shards else np.zeros(0, np.int64))

    def _local(self, i: int) -> tuple[TokenBinSource, int]:
        s = int(self._shard[i])
        return self.shards[s], i - int(self._first[s])

    def _read(self, i: int, start: int, stop: int) -> np.ndarray:
        src, j = self._local(i)
        return src._read(j, start, stop)

    def location(self, i: int, offset: int = 0) -> str:
        src, j = self._local(i)
        return src.location(j, offset)

    def __getstate__(self):
        return dict(self.__dict__)  # the shards drop their own memmaps

    def __repr__(self) -> str:
        return f"PreparedTokenSource({self.path!r})"
