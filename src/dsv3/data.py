"""Pre-training data: corpora -> token shards (memory-mapped) -> packed batches; the FIM transform.

The pipeline, in the order data flows through it:

1. **Sources** (:func:`iter_documents`): text files, directories, JSONL rows, or by default the running
   interpreter's own standard-library ``.py`` sources (:func:`default_corpus_files`), which every Python
   install has, so the default pipeline needs no download.
2. **Split** (:func:`split_of`): a document goes to ``train`` or ``val`` by a hash of its ``doc_id``,
   so the validation set never depends on file order, parallelism or the machine.
3. **FIM** (:func:`fim_split`, :func:`psm_tokens`): DeepSeek-V3 pre-training applies Fill-in-the-Middle
   in the PSM layout to 10% of documents:
   ``<｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>``.
4. **Tokenize once** (:func:`build_dataset`): documents are encoded in batches, each followed by EOS,
   and concatenated (packing without cross-document masking, as in the paper) into
   ``{train,val}_NNNNN.bin`` shards plus ``meta.json``. Builds are atomic and cached by a fingerprint.
5. **Read** (:class:`TokenDataset`, :class:`TokenView`): shards opened with ``np.memmap``; a split reads
   as one contiguous token stream across shard boundaries.
6. **Batch** (:class:`PackedBatches`, :func:`val_batches`): ``[batch_size, seq_len + 1]`` windows,
   shuffled per epoch and exactly resumable from a JSON-serializable state.
7. **Baseline** (:func:`unigram_entropy`): the unigram cross-entropy a model must beat.

Nothing here depends on a particular tokenizer: callers pass an ``encode_batch`` callable and the
special-token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


class DataError(ValueError):
    """A data source, dataset or batching request is unusable; the message names the file/line or split."""


SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_FIM_RATE = 0.1  # DeepSeek-V3 report, pre-training
DEFAULT_SHARD_TOKENS = 16 * 2**20
DEFAULT_BATCH_DOCS = 256

# Extensions read when a *directory* is given (a file given by name is read whatever its extension).
# Prose, markup, configs and common source languages: the things a code+text LM trains on.
# ``.jsonl`` files are parsed as rows with a ``text`` field; every other extension is read as text.
TEXT_EXTENSIONS = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".tex", ".org",
    ".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".csv", ".tsv", ".xml",
    ".html", ".htm", ".css",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".js", ".ts",
    ".sh", ".sql",
})
# Third-party packages installed into the stdlib tree are not the standard library.
_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages"})

DATASET_FORMAT = "dsv3-token-shards"
DATASET_VERSION = 1
META_FILE = "meta.json"
_SHARD_RE = re.compile(r"(train|val)_\d{5,}\.bin\Z")


# ---------------------------------------------------------------------------------------------
# 1. Sources
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """One training document.

    ``doc_id`` is stable across machines: the path relative to the directory it was found in (or to
    the stdlib root for the default corpus), the file name for a file given directly, and
    ``"<file id>:<line>"`` (1-based) for a JSONL row. The split and the FIM decision hash it.
    """

    doc_id: str
    text: str


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (``sysconfig`` ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_regular_readable(path: Path) -> bool:
    # os.stat follows symlinks: a link to a real file counts, a dangling link or a FIFO does not.
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK)


def _walk_files(root: Path, keep: Callable[[str], bool], skip_dirs: frozenset[str]) -> list[Path]:
    """Regular readable files under ``root`` whose name passes ``keep``, sorted by relative path."""
    found = []
    # followlinks=False (the default): a symlinked directory could loop or duplicate the tree.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in skip_dirs and d != "__pycache__" and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and keep(name) and _is_regular_readable(path):
                found.append(path)
    # Sort on the relative POSIX path so the order is the same on every OS and file system.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def default_corpus_files() -> list[Path]:
    """The interpreter's standard-library ``.py`` sources, sorted by path relative to the stdlib root.

    Excludes ``site-packages``/``dist-packages`` (third-party code), ``__pycache__``, hidden
    directories, and anything that is not a regular readable file.
    """
    return _walk_files(stdlib_root(), lambda name: name.endswith(".py"), _PACKAGE_DIRS)


def _is_text_name(name: str) -> bool:
    return Path(name).suffix.lower() in TEXT_EXTENSIONS


def iter_documents(paths: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
                   ) -> Iterator[Document]:
    """Documents from ``paths`` (or the default stdlib corpus when ``None``), in a deterministic order.

    Each path may be:

    - a ``.jsonl`` file: one document per non-blank row, taken from the row's ``text`` field;
    - any other file: one document, read as UTF-8 with ``errors="replace"`` whatever its extension;
    - a directory: walked recursively in sorted order, reading files whose extension is in
      :data:`TEXT_EXTENSIONS`; hidden entries and ``__pycache__`` are skipped, and so are binary
      files (ones containing a NUL byte).

    Documents that are empty or whitespace-only are skipped. All paths are checked before the first
    document is produced: a missing path raises :class:`DataError` naming it, as do a malformed JSONL
    line, a row without a string ``text`` field (``file:line``) and a binary file given by name.
    """
    if paths is None:
        root = stdlib_root()
        sources = [(p, p.relative_to(root).as_posix(), True) for p in default_corpus_files()]
        return _read_sources(sources)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            sources += [(f, f.relative_to(path).as_posix(), True)
                        for f in _walk_files(path, _is_text_name, frozenset())]
        elif path.exists():
            if not _is_regular_readable(path):
                raise DataError(f"data path is not a readable regular file: {path}")
            sources.append((path, path.name, False))
        else:
            raise DataError(f"data path not found: {path}")
    return _read_sources(sources)


def _read_sources(sources: list[tuple[Path, str, bool]]) -> Iterator[Document]:
    for path, doc_id, skip_binary in sources:
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(path, doc_id)
            continue
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from e
        if b"\0" in data:
            if skip_binary:
                continue
            raise DataError(f"{path} looks binary (contains NUL bytes); give a text file")
        text = data.decode("utf-8", errors="replace")
        if text.strip():
            yield Document(doc_id, text)


def _jsonl_documents(path: Path, id_base: str) -> Iterator[Document]:
    try:
        f = open(path, "rb")  # binary: split rows on b"\n" only, decode each row ourselves
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict) or "text" not in row:
                raise DataError(f"{path}:{lineno}: row has no 'text' field")
            text = row["text"]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: 'text' is {type(text).__name__}, not a string")
            if text.strip():
                yield Document(f"{id_base}:{lineno}", text)


class Corpus:
    """A re-iterable :func:`iter_documents`: each iteration re-reads the sources.

    Pass one to :func:`build_dataset` to stream a corpus too large to hold in memory (a one-shot
    iterator is materialized there, because the build reads its documents twice).
    """

    def __init__(self, paths: Sequence[str | os.PathLike] | None = None):
        self.paths = paths
        iter_documents(paths)  # check the paths now, not at the first iteration

    def __iter__(self) -> Iterator[Document]:
        return iter_documents(self.paths)


# ---------------------------------------------------------------------------------------------
# 2. Split
# ---------------------------------------------------------------------------------------------
def _hash_unit(tag: str, key: str) -> bytes:
    # Domain-separated so the split and the FIM decision of a document are independent draws.
    return hashlib.sha256(f"{tag}\0{key}".encode("utf-8", "surrogatepass")).digest()


def split_of(doc_id: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """``"val"`` when ``sha256("split\\0" + doc_id)``, read as a number in [0, 1), is below
    ``val_fraction``, else ``"train"``. Stable across file order, processes and machines."""
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction must be in [0, 1], got {val_fraction}")
    u = int.from_bytes(_hash_unit("split", doc_id)[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


# ---------------------------------------------------------------------------------------------
# 3. FIM (PSM)
# ---------------------------------------------------------------------------------------------
def fim_rng(seed: int, doc_id: str) -> random.Random:
    """The RNG that decides a document's FIM: seeded from sha256 of (seed, doc_id) only, so the
    decision does not depend on document order, batching or worker count."""
    return random.Random(int.from_bytes(_hash_unit("fim", f"{seed}\0{doc_id}")[:8], "big"))


def fim_split(text: str, rng: random.Random, rate: float = DEFAULT_FIM_RATE,
              ) -> tuple[str, str, str] | None:
    """``(prefix, middle, suffix)`` with ``prefix + middle + suffix == text``, or ``None`` (no FIM).

    The first draw ``rng.random() < rate`` picks FIM. Two more draws give character (code point)
    positions ``a, b`` uniform in ``[0, len(text)]``; with ``lo, hi = sorted((a, b))`` the parts are
    ``text[:lo], text[lo:hi], text[hi:]`` (any part may be empty), as in Bavarian et al. 2022.
    Only ``Random.random`` is used: Python guarantees its sequence for a given seed across versions.
    """
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"fim_rate must be in [0, 1], got {rate}")
    if rng.random() >= rate:
        return None
    n = len(text)
    a = min(int(rng.random() * (n + 1)), n)
    b = min(int(rng.random() * (n + 1)), n)
    lo, hi = min(a, b), max(a, b)
    return text[:lo], text[lo:hi], text[hi:]


def psm_tokens(prefix: Sequence[int], middle: Sequence[int], suffix: Sequence[int],
               fim_ids: tuple[int, int, int]) -> np.ndarray:
    """PSM layout ``[fim_begin] + prefix + [fim_hole] + suffix + [fim_end] + middle`` (int64, no EOS).

    ``fim_ids`` = (``<｜fim▁begin｜>``, ``<｜fim▁hole｜>``, ``<｜fim▁end｜>``) ids.
    """
    begin, hole, end = fim_ids
    return np.concatenate([[begin], _ids(prefix), [hole], _ids(suffix), [end], _ids(middle)]
                          ).astype(np.int64)


def _ids(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def encode_documents(documents: Sequence[Document], encode_batch: Callable[[list[str]], list[list[int]]],
                     eos_id: int, fim_ids: tuple[int, int, int] | None = None,
                     fim_rate: float = DEFAULT_FIM_RATE, seed: int = 0,
                     ) -> list[tuple[np.ndarray, bool]]:
    """Each document's tokens as laid out in the stream (int64, EOS last) and whether it got FIM.

    One ``encode_batch`` call covers the whole batch: every document contributes its text, or its
    three FIM parts, so the tokenizer's own parallelism sees all of them at once. Empty parts are
    not sent (they encode to nothing). ``encode_batch`` must not add BOS/EOS itself. FIM is off when
    ``fim_ids`` is ``None``.
    """
    texts: list[str] = []
    plans: list[list[int | None]] = []  # per document: index into texts of each part, None = empty
    for doc in documents:
        parts = None
        if fim_ids is not None:
            parts = fim_split(doc.text, fim_rng(seed, doc.doc_id), fim_rate)
        slots: list[int | None] = []
        for part in parts if parts is not None else (doc.text,):
            slots.append(len(texts) if part else None)
            if part:
                texts.append(part)
        plans.append(slots)
    encoded = encode_batch(texts) if texts else []
    if len(encoded) != len(texts):
        raise DataError(f"encode_batch returned {len(encoded)} sequences for {len(texts)} texts")
    empty = np.zeros(0, dtype=np.int64)
    out = []
    for slots in plans:
        parts_ids = [_ids(encoded[s]) if s is not None else empty for s in slots]
        if len(parts_ids) == 3:
            prefix, middle, suffix = parts_ids
            body = psm_tokens(prefix, middle, suffix, fim_ids)
        else:
            body = parts_ids[0]
        out.append((np.concatenate([body, np.array([eos_id], dtype=np.int64)]), len(parts_ids) == 3))
    return out


# ---------------------------------------------------------------------------------------------
# 4. Build token shards
# ---------------------------------------------------------------------------------------------
def _storage_dtype(vocab_size: int) -> np.dtype:
    # Shards are little-endian on every machine so a dataset can be copied between hosts.
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class _ShardWriter:
    """Appends one split's token stream to ``<split>_NNNNN.bin`` files of exactly ``shard_tokens``
    tokens (the last one shorter). Documents may straddle shards; readers see one stream."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[dict[str, Any]] = []
        self.num_tokens = self.num_docs = self.num_fim_docs = 0

    def add(self, tokens: np.ndarray, fim: bool) -> None:
        self.pending.append(tokens.astype(self.dtype))
        self.pending_len += len(tokens)
        self.num_tokens += len(tokens)
        self.num_docs += 1
        self.num_fim_docs += int(fim)
        if self.pending_len >= self.shard_tokens:
            self._drain(final=False)

    def close(self) -> None:
        if self.pending_len:
            self._drain(final=True)

    def _drain(self, final: bool) -> None:
        buf = np.concatenate(self.pending)
        start = 0
        while len(buf) - start >= self.shard_tokens or (final and start < len(buf)):
            self._write(buf[start:start + self.shard_tokens])
            start += self.shard_tokens
        rest = buf[start:]
        self.pending = [rest] if len(rest) else []
        self.pending_len = len(rest)

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        with open(self.directory / name, "wb") as f:
            f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())  # durable before the directory rename makes the dataset visible
        self.shards.append({"file": name, "num_tokens": int(len(tokens))})


class _Fingerprint:
    """sha256 over the build settings and every document's id and content, length-prefixed so that
    no two different inputs hash the same stream of bytes. Content, not mtimes: copying or touching
    files does not force a rebuild, and any edit does."""

    def __init__(self, settings: dict[str, Any]):
        self.h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        self.num_docs = 0

    def add(self, doc: Document) -> None:
        for field in (doc.doc_id, doc.text):
            data = field.encode("utf-8", "surrogatepass")  # JSON rows may hold lone surrogates
            self.h.update(len(data).to_bytes(8, "little"))
            self.h.update(data)
        self.num_docs += 1

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str, refresh: bool = True) -> None: ...
    def close(self) -> None: ...


class _RichBar:
    def __init__(self, total: int, desc: str):
        from rich.progress import Progress
        self.progress = Progress()
        self.progress.start()
        self.desc = desc
        self.task = self.progress.add_task(desc, total=total)

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.progress.update(self.task, description=f"{self.desc} {s}")

    def close(self) -> None:
        self.progress.stop()


def _progress_bar(total: int, enabled: bool, desc: str = "tokenizing"):
    # tqdm and rich are optional extras of the package: fall back to no bar rather than fail.
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="doc", dynamic_ncols=True)
    except ImportError:
        pass
    try:
        return _RichBar(total, desc)
    except ImportError:
        return _NoBar()


def _open_if_current(out_dir: Path, fingerprint: str) -> TokenDataset | None:
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        return TokenDataset(out_dir)
    except (OSError, ValueError):  # missing, unreadable, or a DataError from a damaged dataset
        return None


def _check_replaceable(out_dir: Path) -> None:
    # A rebuild replaces out_dir wholesale; never delete something that is not one of our datasets.
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"dataset path {out_dir} exists and is not a directory")
    for entry in out_dir.iterdir():
        if entry.name != META_FILE and not _SHARD_RE.match(entry.name):
            raise DataError(f"{out_dir} holds {entry.name!r}, which is not part of a token dataset; "
                            "refusing to replace it (choose another out_dir)")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _install(tmp: Path, out_dir: Path) -> None:
    """Atomically make ``tmp`` the dataset at ``out_dir``; a previous dataset is moved aside first
    because ``rename`` cannot replace a non-empty directory."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_dataset(out_dir: str | os.PathLike,
                  documents: Iterable[Document] | None,
                  encode_batch: Callable[[list[str]], list[list[int]]],
                  eos_id: int,
                  vocab_size: int,
                  fim_ids: tuple[int, int, int] | None = None,
                  fim_rate: float = DEFAULT_FIM_RATE,
                  seed: int = 0,
                  val_fraction: float = DEFAULT_VAL_FRACTION,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  progress: bool = True,
                  *,
                  tokenizer_fingerprint: str = "",
                  batch_docs: int = DEFAULT_BATCH_DOCS) -> TokenDataset:
    """Tokenize ``documents`` once into memory-mapped shards under ``out_dir``; return the dataset.

    Layout of ``out_dir``:

    - ``train_NNNNN.bin``, ``val_NNNNN.bin``: raw little-endian token ids (``uint16`` when
      ``vocab_size <= 65535``, else ``uint32``), ``shard_tokens`` per file except the last. Each split
      is one stream: every document's tokens followed by ``eos_id``, documents in input order.
    - ``meta.json``: format, dtype, per-split token/document/FIM counts and shard list, the build
      settings and ``fingerprint``.

    ``documents`` defaults (``None``) to the stdlib corpus. A document's split is
    :func:`split_of` (``doc_id``, ``val_fraction``); with ``fim_ids`` it gets FIM with probability
    ``fim_rate`` (see :func:`encode_documents`) in either split, so the val loss is measured on the
    same mixture the model trains on. ``encode_batch`` receives up to ``batch_docs``
    documents' texts (or FIM parts) per call and must not add special tokens.

    Caching: the fingerprint hashes every document's id and content plus all settings and the
    caller's ``tokenizer_fingerprint`` (say, a hash of the tokenizer file). If ``out_dir`` already
    holds a dataset with that fingerprint it is returned without tokenizing; otherwise it is rebuilt.

    Atomicity: everything is written into a sibling temporary directory, ``meta.json`` last, then
    renamed into place; an interrupted build leaves either the previous dataset or nothing at
    ``out_dir``. A crash that kills the process may leave a ``.<name>.tmp-*`` sibling to delete.

    A one-shot iterator of documents is held in memory (they are read twice: fingerprint, then
    tokens); pass a list or a re-iterable such as :class:`Corpus` to stream instead.
    """
    out_dir = Path(out_dir)
    if vocab_size < 1 or vocab_size > 2**32:
        raise DataError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    specials = {"eos_id": eos_id}
    if fim_ids is not None:
        fim_ids = tuple(int(i) for i in fim_ids)
        if len(fim_ids) != 3 or len(set(fim_ids)) != 3:
            raise DataError(f"fim_ids must be three distinct ids (begin, hole, end), got {fim_ids}")
        specials.update(zip(("fim_begin", "fim_hole", "fim_end"), fim_ids))
    for name, i in specials.items():
        if not 0 <= i < vocab_size:
            raise DataError(f"{name}={i} is outside the vocabulary [0, {vocab_size})")
    if not 0.0 <= fim_rate <= 1.0:
        raise DataError(f"fim_rate must be in [0, 1], got {fim_rate}")
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if shard_tokens < 1 or batch_docs < 1:
        raise DataError("shard_tokens and batch_docs must be positive")

    dtype = _storage_dtype(vocab_size)
    settings = {
        "format": DATASET_FORMAT, "version": DATASET_VERSION, "dtype": dtype.name,
        "vocab_size": vocab_size, "eos_id": eos_id,
        "fim_ids": list(fim_ids) if fim_ids is not None else None,
        "fim_rate": fim_rate if fim_ids is not None else 0.0,
        "seed": seed, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
        "tokenizer_fingerprint": tokenizer_fingerprint,
    }
    if documents is None:
        documents = iter_documents(None)
    if iter(documents) is documents:
        documents = list(documents)

    first = _Fingerprint(settings)
    for doc in documents:
        first.add(doc)
    cached = _open_if_current(out_dir, first.hexdigest())
    if cached is not None:
        return cached

    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    bar = _progress_bar(first.num_docs, progress)
    t0 = time.perf_counter()
    try:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        # Fingerprint what is actually tokenized: if a file changes between the two passes, the
        # stored fingerprint still describes the shards and the next build sees the difference.
        seen = _Fingerprint(settings)
        total_tokens = 0

        def flush(batch: list[Document]) -> None:
            nonlocal total_tokens
            for doc, (tokens, fim) in zip(batch, encode_documents(batch, encode_batch, eos_id,
                                                                   fim_ids, fim_rate, seed)):
                if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
                    bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
                    raise DataError(f"{doc.doc_id}: token id {bad} outside [0, {vocab_size})")
                writers[split_of(doc.doc_id, val_fraction)].add(tokens, fim)
                total_tokens += len(tokens)
            bar.update(len(batch))
            bar.set_postfix_str(f"{total_tokens / 1e6:.2f}M tokens", refresh=False)

        batch: list[Document] = []
        for doc in documents:
            seen.add(doc)
            if not doc.text.strip():  # same rule as iter_documents, for hand-made documents
                bar.update(1)
                continue
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        for w in writers.values():
            w.close()

        meta = {
            "format": DATASET_FORMAT, "version": DATASET_VERSION,
            "fingerprint": seen.hexdigest(), "settings": settings,
            "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id,
            "fim_ids": settings["fim_ids"], "fim_rate": settings["fim_rate"], "seed": seed,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "num_input_docs": seen.num_docs,
            "splits": {s: {"num_tokens": w.num_tokens, "num_docs": w.num_docs,
                           "num_fim_docs": w.num_fim_docs, "shards": w.shards}
                       for s, w in writers.items()},
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return TokenDataset(out_dir)


# ---------------------------------------------------------------------------------------------
# 5. Read
# ---------------------------------------------------------------------------------------------
class TokenView:
    """One split's token stream across its shards, read-only and ``np.ndarray``-like.

    ``len(view)``, ``view[i]``, ``view[a:b]`` and ``view.read(start, n)`` return numpy data; a range
    inside one shard is a zero-copy view of the memmap, a range across shards is a copy.
    ``np.asarray(view)`` reads the whole stream.
    """

    def __init__(self, arrays: list[np.ndarray], dtype: np.dtype):
        self.arrays = arrays
        self.dtype = dtype
        self._starts = np.cumsum([0] + [len(a) for a in arrays])  # [num_shards + 1] stream offsets

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` of the stream, across shard boundaries."""
        start, n = int(start), int(n)
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"window [{start}, {start + n}) outside a stream of {len(self)} tokens")
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while n > 0:
            arr = self.arrays[shard]
            offset = start - int(self._starts[shard])
            take = min(n, len(arr) - offset)
            pieces.append(arr[offset:offset + take])
            start, n, shard = start + take, n - take, shard + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.read(start, max(0, stop - start))
            positions = np.arange(start, stop, step)
            if len(positions) == 0:
                return np.zeros(0, dtype=self.dtype)
            lo = int(positions.min())
            return self.read(lo, int(positions.max()) - lo + 1)[positions - lo]
        i = int(key)
        if i < 0:
            i += len(self)
        return self.read(i, 1)[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read(0, len(self))
        return out.astype(dtype) if dtype is not None else np.array(out)

    def iter_chunks(self, chunk_tokens: int = 2**24) -> Iterator[np.ndarray]:
        """The stream in consecutive pieces of at most ``chunk_tokens`` (for bounded-memory scans)."""
        for arr in self.arrays:
            for i in range(0, len(arr), chunk_tokens):
                yield arr[i:i + chunk_tokens]


class TokenDataset:
    """A dataset written by :func:`build_dataset`, with its shards opened as read-only ``np.memmap``."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir)
        meta_path = self.path / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise DataError(f"no token dataset at {self.path} ({META_FILE} missing)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {meta_path}: {e}") from e
        if meta.get("format") != DATASET_FORMAT or meta.get("version") != DATASET_VERSION:
            raise DataError(f"{meta_path} is not a {DATASET_FORMAT} v{DATASET_VERSION} dataset")
        self.meta: dict[str, Any] = meta
        try:
            self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
            self._views = {s: self._open_split(s) for s in SPLITS}
        except (KeyError, TypeError) as e:
            raise DataError(f"{meta_path} is incomplete or malformed ({e!r})") from e

    def _open_split(self, split: str) -> TokenView:
        info = self.meta["splits"][split]
        arrays = []
        for shard in info["shards"]:
            path = self.path / shard["file"]
            expected = shard["num_tokens"] * self.dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                raise DataError(f"shard {path} has {size} bytes, meta.json says {expected}")
            arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        view = TokenView(arrays, self.dtype)
        if len(view) != info["num_tokens"]:
            raise DataError(f"{split} shards hold {len(view)} tokens, meta.json says {info['num_tokens']}")
        return view

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def _check_split(self, split: str) -> None:
        if split not in self._views:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")

    def tokens(self, split: str) -> TokenView:
        """The split's token stream (see :class:`TokenView`)."""
        self._check_split(split)
        return self._views[split]

    def num_tokens(self, split: str) -> int:
        """Tokens in the split, EOS separators included."""
        return len(self.tokens(split))

    def num_docs(self, split: str) -> int:
        """Documents in the split."""
        self._check_split(split)
        return int(self.meta["splits"][split]["num_docs"])

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_tokens(s):,} tokens/{self.num_docs(s):,} docs" for s in SPLITS)
        return f"TokenDataset({str(self.path)!r}, {counts})"


# ---------------------------------------------------------------------------------------------
# 6. Batches
# ---------------------------------------------------------------------------------------------
def _num_windows(num_tokens: int, seq_len: int) -> int:
    # Window k covers tokens [k*seq_len, k*seq_len + seq_len + 1): consecutive windows share one
    # token, so every token after the first is a target exactly once per pass.
    return max(0, (num_tokens - 1) // seq_len)


def _require_windows(dataset: TokenDataset, split: str, seq_len: int) -> int:
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    n = dataset.num_tokens(split)
    windows = _num_windows(n, seq_len)
    if windows == 0:
        raise DataError(f"split {split!r} has {n} tokens, fewer than one window of "
                        f"seq_len + 1 = {seq_len + 1}")
    return windows


def epoch_permutation(num_windows: int, seed: int) -> np.ndarray:
    """A random permutation of ``range(num_windows)`` defined by our own arithmetic: sort the
    windows by a splitmix64 hash of (key, index). numpy's ``Generator`` promises no stream stability
    across versions; this does, so a saved position resumes the same order anywhere."""
    key = int.from_bytes(_hash_unit("perm", str(seed))[:8], "big")
    with np.errstate(over="ignore"):
        z = np.arange(num_windows, dtype=np.uint64) + np.uint64(key)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    # splitmix64 is a bijection of uint64, so the keys are distinct and the order is unambiguous.
    return np.argsort(z, kind="stable")


def _stack_windows(tokens: TokenView, starts: Iterable[int], seq_len: int) -> torch.Tensor:
    rows = [tokens.read(s, seq_len + 1) for s in starts]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


class PackedBatches:
    """Infinite iterator of training batches: LongTensor ``[batch_size, seq_len + 1]``.

    Inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]``. Windows start at ``k * seq_len`` for
    ``k < (num_tokens - 1) // seq_len``, so they do not overlap and each token is a target once per
    epoch. Each epoch ``e`` visits every window once in a random order seeded by ``seed + e``.
    Batches take consecutive windows of that endless sequence, so every batch is full and a batch
    may span two epochs; ``batch_size`` may change between steps (a batch-size ramp) without
    breaking the once-per-epoch property.

    With ``world_size > 1`` a step consumes ``batch_size * world_size`` windows and this rank gets
    its slice ``[rank * batch_size, (rank + 1) * batch_size)``; ranks share one state.

    :meth:`state_dict` / :meth:`load_state_dict` resume exactly: after loading, the next batches
    are the ones the saved iterator would have produced.
    """

    STATE_VERSION = 1

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, split: str = "train",
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside world_size {world_size}")
        self.dataset, self.split, self.seq_len = dataset, split, seq_len
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.tokens = dataset.tokens(split)
        self.num_windows = _require_windows(dataset, split, seq_len)
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next window to serve
        self._perm: np.ndarray | None = None
        self._perm_key: tuple[int, int] | None = None

    def _permutation(self) -> np.ndarray:
        key = (self.seed, self.epoch)
        if self._perm_key != key:
            self._perm = epoch_permutation(self.num_windows, self.seed + self.epoch)
            self._perm_key = key
        return self._perm

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        need = self.batch_size * self.world_size
        chosen = []
        while need:
            perm = self._permutation()
            take = min(need, self.num_windows - self.position)
            chosen.append(perm[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        windows = np.concatenate(chosen)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return _stack_windows(self.tokens, (int(k) * self.seq_len for k in windows), self.seq_len)

    @property
    def epoch_progress(self) -> float:
        """Epochs completed so far, fractional."""
        return self.epoch + self.position / self.num_windows

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position: enough to resume the exact batch sequence."""
        return {
            "version": self.STATE_VERSION, "split": self.split, "seed": self.seed,
            "seq_len": self.seq_len, "num_windows": self.num_windows,
            "epoch": self.epoch, "position": self.position,
            "batch_size": self.batch_size, "world_size": self.world_size,
            "dataset_fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. The dataset, split and ``seq_len`` must match; the seed
        comes from the state. ``batch_size`` and ``world_size`` keep their current values."""
        if state.get("version") != self.STATE_VERSION:
            raise DataError(f"unknown PackedBatches state version {state.get('version')!r}")
        for name, ours in (("split", self.split), ("seq_len", self.seq_len),
                           ("num_windows", self.num_windows),
                           ("dataset_fingerprint", self.dataset.fingerprint)):
            if state.get(name) != ours:
                raise DataError(f"batch state was saved with {name}={state.get(name)!r}, "
                                f"this iterator has {ours!r}")
        if not 0 <= state["position"] < self.num_windows or state["epoch"] < 0:
            raise DataError(f"batch state position {state['epoch']}:{state['position']} is invalid")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


def val_batches(dataset: TokenDataset, batch_size: int, seq_len: int,
                max_batches: int | None = None, split: str = "val") -> list[torch.Tensor]:
    """A fixed validation set: windows ``k * seq_len`` for ``k = 0, 1, ...`` in order, grouped into
    LongTensor batches ``[batch_size, seq_len + 1]`` (the last may hold fewer rows), at most
    ``max_batches`` of them. Same dataset and arguments, same tensors."""
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    windows = _require_windows(dataset, split, seq_len)
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    tokens = dataset.tokens(split)
    return [_stack_windows(tokens, (k * seq_len for k in range(b, min(b + batch_size, windows))), seq_len)
            for b in range(0, windows, batch_size)]


# ---------------------------------------------------------------------------------------------
# 7. Baseline
# ---------------------------------------------------------------------------------------------
def _token_counts(tokens: TokenView, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in tokens.iter_chunks():
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_entropy(dataset: TokenDataset, split: str = "train", eval_split: str = "val") -> float:
    """Unigram cross-entropy baseline in nats: a distribution fitted on ``split`` with add-one
    smoothing over the whole vocabulary, ``p(v) = (count(v) + 1) / (N + V)``, scored as the mean
    ``-log p`` over every token of ``eval_split``. A model's val loss should fall well below it."""
    vocab = dataset.vocab_size
    target = _token_counts(dataset.tokens(eval_split), vocab)
    if target.sum() == 0:
        raise DataError(f"split {eval_split!r} is empty; no unigram baseline to evaluate")
    counts = _token_counts(dataset.tokens(split), vocab)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + float(vocab))
    return float(-(target * log_p).sum() / target.sum())
