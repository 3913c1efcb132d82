"""Deterministic token data for language-model training.

Everything here is NumPy; no network, no JAX arrays (JAX is only asked for the
process index/count when those are not given).

Sources (``load_tokens``)
-------------------------
``source`` is a mapping or an object with attributes (e.g.
``tasks.lm.config.TextDataConfig``); missing keys take the defaults below.

==================  ==========================================================
key                 meaning
==================  ==========================================================
source              ``"builtin"`` (default), ``"text"``, ``"jsonl"`` or ``"bin"``
path                file or directory (required unless ``builtin``)
tokenizer           ``"byte"`` (default) or a path to a Hugging Face
                    ``tokenizer.json`` (needs the ``tokenizers`` package)
jsonl_field         text field of each JSON line (default ``"text"``)
bin_dtype           dtype of a ``.bin`` token file: ``"uint16"`` (default) or
                    ``"uint32"``
val_fraction        fraction of tokens held out for validation (default 0.05)
max_corpus_bytes    cap on the builtin corpus (default 8 MiB, ~1 s to load)
vocab_size          optional; only for ``bin`` data whose ids exceed the
                    tokenizer's vocabulary (ids are checked against it)
==================  ==========================================================

* ``builtin``: the text already on every machine with Python: the
  ``pydoc_data`` topics (sorted by name) followed by the standard library's
  ``.py`` files (no ``site-packages``/``dist-packages``, no ``test``/``tests``/
  ``idle_test`` dirs, no ``pydoc_data``). Files are ordered by the SHA-256 of
  their path relative to the stdlib root (a fixed order that mixes packages,
  so a byte cap still samples the whole library) and taken while they fit the
  cap. The corpus depends only on the Python installation.
* ``text``: one UTF-8 file, or every text file under a directory, whatever
  its extension (``.txt``, ``.md``, none...): recursive, in the sorted order of
  the paths relative to the directory, hidden files and directories (``.*``)
  left out. A file holding a NUL byte or bytes that are not UTF-8 counts as
  binary and is skipped (``TokenData.skipped_files`` counts them). One
  document per file.
* ``jsonl``: one or more ``.jsonl`` files (a file or a directory of them); one
  document per line, text under ``jsonl_field``.
* ``bin``: a flat pre-tokenized array read with ``np.memmap`` (never copied).

Documents are tokenized and joined into one stream, each followed by EOS.

Split: the **last** ``val_fraction`` of the token stream is validation, the
rest is training (for every source, so ``.bin`` files split the same way).

Byte tokenizer: ids 0..255 are UTF-8 bytes, BOS=256, EOS=257, PAD=258,
``vocab_size=259``. Streams are stored as uint16 (uint32 for vocabularies
over 65536 ids); batches are int32.

Batches (``TokenBatchIterator``)
--------------------------------
Each epoch cuts the training stream into windows of ``seq_len + 1`` tokens
starting at ``offset + k * seq_len`` (``inputs = window[:-1]``,
``targets = window[1:]``) and visits them in a random order; the offset in
``[0, seq_len)`` and the order both come from ``np.random.default_rng((seed,
epoch))``, so epochs differ but every run with the same seed sees the same
stream. A global batch is the next ``global_batch_size`` windows of that
order; process ``p`` of ``n`` yields rows ``[p * B/n, (p + 1) * B/n)``. Windows
left over at the end of an epoch (fewer than a batch) are skipped.
``get_state()`` is ``{"seed", "epoch", "position"}`` (position = windows of
this epoch already consumed), plain ints, for the checkpoint.

Example:
    >>> train, val, vocab_size = load_tokens({"source": "builtin",
    ...                                       "max_corpus_bytes": 1 << 20})
    >>> batches = TokenBatchIterator(train, global_batch_size=8, seq_len=64, seed=0,
    ...                              process_index=0, process_count=1)
    >>> batch = next(batches)
    >>> batch["inputs"].shape, batch["targets"].dtype
    ((8, 64), dtype('int32'))
    >>> state = batches.get_state()      # store with the checkpoint
    >>> batches.set_state(state)         # ... later: continue the same stream
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from training.data import EpochBatchIterator, process_slice

__all__ = [
    "ByteTokenizer",
    "DEFAULT_MAX_CORPUS_BYTES",
    "HFTokenizer",
    "TokenBatchIterator",
    "TokenData",
    "builtin_documents",
    "eval_batches",
    "load_tokens",
    "make_tokenizer",
    "tokenize_documents",
]

DEFAULT_MAX_CORPUS_BYTES = 8 * 1024 * 1024
_BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SOURCES = ("builtin", "text", "jsonl", "bin")
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
)
# End-of-document tokens of common HF tokenizers, tried in this order.
_HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS=256, EOS=257, PAD=258."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        """uint16 ids of the UTF-8 bytes of ``text`` (no specials added)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the byte ids; special ids are dropped, bad UTF-8 replaced."""
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (via the ``tokenizers`` package).

    Args:
        path: Path to ``tokenizer.json``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImportError: the ``tokenizers`` package is not installed.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {str(path)!r}")
        try:  # Optional dependency: import only when a tokenizer.json is used.
            import tokenizers
        except ImportError as error:
            raise ImportError(
                f"Using the Hugging Face tokenizer {str(path)!r} needs the 'tokenizers' "
                "package: pip install tokenizers (or use tokenizer: byte)."
            ) from error
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        # No EOS in the vocabulary: documents are simply concatenated.
        self.eos_id = next(
            (
                self._tokenizer.token_to_id(t)
                for t in _HF_EOS_CANDIDATES
                if self._tokenizer.token_to_id(t) is not None
            ),
            None,
        )

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(
            self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32
        )

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def make_tokenizer(name: str = "byte") -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a tokenizer.json path."""
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def _stream_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_documents(documents: Sequence[str], tokenizer) -> np.ndarray:
    """One token stream: every document's ids followed by the EOS id."""
    if isinstance(tokenizer, HFTokenizer):
        pieces = tokenizer.encode_batch(documents)
    else:
        pieces = [tokenizer.encode(doc) for doc in documents]
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id])
    parts = []
    for ids in pieces:
        parts.append(ids)
        if eos is not None:
            parts.append(eos)
    dtype = _stream_dtype(tokenizer.vocab_size)
    return np.concatenate(parts).astype(dtype) if parts else np.zeros((0,), dtype)


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(path relative to the stdlib root, absolute path) of every library .py."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirs, files in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (slow, not stdlib).
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        for name in files:
            if name.endswith(".py"):
                path = Path(directory, name)
                found.append((path.relative_to(root).as_posix(), path))
    return found


def builtin_documents(max_bytes: int = DEFAULT_MAX_CORPUS_BYTES) -> list[str]:
    """The embedded default corpus: pydoc topics, then stdlib sources, capped.

    Args:
        max_bytes: Stop adding documents once their UTF-8 size would pass this.

    Returns:
        Documents in their fixed order (see the module docstring).
    """
    if max_bytes <= 0:
        raise ValueError(f"max_corpus_bytes must be > 0, got {max_bytes}")
    documents: list[str] = []
    total = 0

    def add(text: str, size: int):
        nonlocal total
        if text and total + size <= max_bytes:
            documents.append(text)
            total += size

    try:
        from pydoc_data.topics import topics
    except ImportError:  # Some minimal Python builds ship without pydoc_data.
        topics = {}
    for name in sorted(topics):
        add(topics[name], len(topics[name].encode("utf-8")))

    sources = sorted(
        _stdlib_sources(), key=lambda item: hashlib.sha256(item[0].encode()).hexdigest()
    )
    for _, path in sources:
        if total >= max_bytes:
            break
        size = path.stat().st_size
        if total + size > max_bytes:
            continue  # too big for what is left of the cap; smaller files may fit
        raw = path.read_bytes()
        add(raw.decode("utf-8", errors="replace"), len(raw))
    return documents


def _files_under(path: Path, suffix: str) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
    return [path]


def _text_documents(path: Path) -> tuple[list[str], int]:
    """The documents of a text file or directory, and how many binary files were skipped."""
    if not path.is_dir():  # a file named explicitly is read as text
        return [path.read_text(encoding="utf-8", errors="replace")], 0
    files = sorted(
        (p.relative_to(path).as_posix(), p)
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    documents, skipped = [], 0
    for _, file in files:
        text = _decode_text(file.read_bytes())
        if text is None:
            skipped += 1
        else:
            documents.append(text)
    return documents, skipped


def _decode_text(data: bytes) -> str | None:
    """``data`` as UTF-8 text, or None for binary data (a NUL byte, or not UTF-8)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(path: Path, field: str) -> list[str]:
    documents = []
    for file in _files_under(path, ".jsonl"):
        with open(file, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{file}:{line_number}: not valid JSON ({error})") from None
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{file}:{line_number}: no field {field!r} (set jsonl_field)")
                documents.append(str(record[field]))
    return documents


# ---------------------------------------------------------------------------
# load_tokens
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenData:
    """Result of :func:`load_tokens`; unpacks as ``train, val, vocab_size``.

    ``skipped_files``: binary files left out of a ``text`` directory.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    skipped_files: int = 0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.val, self.vocab_size))


def _option(source: Any, name: str, default: Any) -> Any:
    if isinstance(source, Mapping):
        value = source.get(name, default)
    else:
        value = getattr(source, name, default)
    return default if value is None else value


def load_tokens(source: Any = None) -> TokenData:
    """Loads, tokenizes and splits a corpus (see the module docstring).

    Args:
        source: A mapping or config object with the keys of the module
            docstring; None means the builtin corpus with defaults.

    Returns:
        ``TokenData(train, val, vocab_size, skipped_files)``: 1-D unsigned-int
        token streams (``np.memmap`` views for ``bin``), the tokenizer's
        vocabulary size and the number of binary files a ``text`` directory skipped.

    Raises:
        FileNotFoundError: ``path`` (or the tokenizer file) does not exist.
        ValueError: unknown option value, empty corpus, bad JSON lines, or
            token ids outside the vocabulary.
    """
    source = {} if source is None else source
    skipped_files = 0
    kind = _option(source, "source", "builtin")
    if kind not in _SOURCES:
        raise ValueError(f"data source must be one of {_SOURCES}, got {kind!r}")
    val_fraction = float(_option(source, "val_fraction", 0.05))
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tokenizer = make_tokenizer(_option(source, "tokenizer", "byte"))
    vocab_size = tokenizer.vocab_size

    if kind == "builtin":
        documents = builtin_documents(
            int(_option(source, "max_corpus_bytes", DEFAULT_MAX_CORPUS_BYTES))
        )
        description = "builtin"
    else:
        raw_path = _option(source, "path", None)
        if raw_path is None:
            raise ValueError(f"data path is required for source {kind!r}")
        path = Path(raw_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data path not found: {str(path)!r}")
        description = f"{kind} {str(path)!r}"
        if kind == "text":
            documents, skipped_files = _text_documents(path)
        elif kind == "jsonl":
            documents = _jsonl_documents(path, _option(source, "jsonl_field", "text"))
    if kind == "bin":
        dtype_name = _option(source, "bin_dtype", "uint16")
        if dtype_name not in _BIN_DTYPES:
            raise ValueError(f"bin_dtype must be one of {sorted(_BIN_DTYPES)}, got {dtype_name!r}")
        if path.stat().st_size == 0:
            raise ValueError(f"The {description} corpus is empty (0 bytes).")
        tokens = np.memmap(path, dtype=_BIN_DTYPES[dtype_name], mode="r")
        vocab_size = int(_option(source, "vocab_size", vocab_size))
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise ValueError(
                f"{description} holds token id {largest}, outside the vocabulary of "
                f"{vocab_size}: set tokenizer to the tokenizer.json it was made with "
                "(or vocab_size)"
            )
    else:
        documents = [doc for doc in documents if doc]
        if not documents:
            binary = f"; {skipped_files} binary file(s) skipped" if skipped_files else ""
            raise ValueError(f"The {description} corpus is empty (no non-empty documents{binary}).")
        tokens = tokenize_documents(documents, tokenizer)
    if len(tokens) < 2:
        raise ValueError(f"The {description} corpus is empty (only {len(tokens)} tokens).")

    num_val = max(1, int(round(len(tokens) * val_fraction)))
    split = len(tokens) - num_val
    return TokenData(
        train=tokens[:split], val=tokens[split:], vocab_size=vocab_size, skipped_files=skipped_files
    )


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def _windows_to_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict:
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class TokenBatchIterator(EpochBatchIterator):
    """Endless, seeded, resumable iterator of next-token batches.

    Args:
        tokens: 1-D token stream (array or memmap).
        global_batch_size: Rows of a batch over all processes.
        seq_len: Tokens per row; each row reads ``seq_len + 1`` tokens.
        seed: Fixes the per-epoch offsets and orders.
        process_index, process_count: This process's share of each global
            batch; None asks JAX.

    Yields:
        ``{"inputs": int32[B/n, seq_len], "targets": int32[B/n, seq_len]}``.

    Raises:
        ValueError: the stream is shorter than ``seq_len + 1`` tokens or holds
            fewer windows than one global batch, or the batch does not split
            over the processes.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        global_batch_size: int,
        seq_len: int,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        if len(tokens) < 2 * seq_len:
            # 2x: every epoch offset in [0, seq_len) must still leave one window.
            raise ValueError(
                f"seq_len={seq_len} is too long for a token stream of {len(tokens)} tokens "
                f"(need at least {2 * seq_len})"
            )
        min_windows = (len(tokens) - seq_len) // seq_len  # fewest windows of any epoch
        if min_windows < global_batch_size:
            raise ValueError(
                f"The token stream ({len(tokens)} tokens) holds only {min_windows} windows of "
                f"seq_len={seq_len}, fewer than global_batch_size={global_batch_size}"
            )
        self._tokens, self.seq_len = tokens, seq_len
        super().__init__(
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def _order_for_epoch(self, epoch: int) -> np.ndarray:
        """Shuffled window start offsets of one epoch, from (seed, epoch) only."""
        rng = np.random.default_rng((self.seed, epoch))
        offset = int(rng.integers(self.seq_len))
        num_windows = (len(self._tokens) - 1 - offset) // self.seq_len
        return offset + self.seq_len * rng.permutation(num_windows)

    def _batch(self, starts: np.ndarray) -> dict:
        return _windows_to_batch(self._tokens, starts, self.seq_len)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in the current epoch (it may differ by one between epochs)."""
        return len(self._order) // self.global_batch_size


def eval_batches(
    val_tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """Fixed validation batches: consecutive windows from the stream's start.

    Global batch ``b`` holds windows starting at ``(b * batch_size + i) * seq_len``;
    each process yields its rows of it, like :class:`TokenBatchIterator`.

    Args:
        val_tokens: 1-D validation stream.
        batch_size: Global rows per batch.
        seq_len: Tokens per row.
        max_batches: At most this many batches (None: as many as fit).
        process_index, process_count: As in :class:`TokenBatchIterator`.

    Raises:
        ValueError: not even one full batch fits in ``val_tokens``.
    """
    first_row, rows = process_slice(batch_size, process_index, process_count)
    num_windows = (len(val_tokens) - 1) // seq_len if seq_len > 0 else 0
    num_batches = num_windows // batch_size
    if num_batches == 0:
        raise ValueError(
            f"Validation stream of {len(val_tokens)} tokens is too short for one batch of "
            f"{batch_size} x seq_len={seq_len} (raise val_fraction or lower the sizes)"
        )
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)

    # A nested generator so the checks above run when eval_batches is called.
    def batches():
        for b in range(num_batches):
            window_ids = b * batch_size + first_row + np.arange(rows)
            yield _windows_to_batch(val_tokens, window_ids * seq_len, seq_len)

    return batches()
