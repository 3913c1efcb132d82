"""Tests for training/data.py (small corpora: the CPU is shared)."""

import json
import sys
import types

import numpy as np
import pytest

from tasks.lm.data import (
    ByteTokenizer,
    TokenBatchIterator,
    builtin_documents,
    eval_batches,
    load_tokens,
    tokenize_documents,
)

SMALL_CORPUS = {"source": "builtin", "max_corpus_bytes": 256 * 1024}


def make_iterator(tokens, *, batch=4, seq=8, seed=0, index=0, count=1):
    return TokenBatchIterator(
        tokens,
        global_batch_size=batch,
        seq_len=seq,
        seed=seed,
        process_index=index,
        process_count=count,
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


@pytest.fixture(scope="module")
def small_stream():
    return np.arange(1000, dtype=np.uint16) % 259


# --- default corpus -------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_split():
    first, second = load_tokens(SMALL_CORPUS), load_tokens(SMALL_CORPUS)
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)
    assert first.vocab_size == 259
    assert len(first.train) > 0 and len(first.val) > 0
    # Disjoint: validation is exactly the tail of the stream, 5% of it by default.
    stream = tokenize_documents(
        builtin_documents(SMALL_CORPUS["max_corpus_bytes"]), ByteTokenizer()
    )
    np.testing.assert_array_equal(np.concatenate([first.train, first.val]), stream)
    assert abs(len(first.val) / len(stream) - 0.05) < 1e-3


def test_builtin_documents_respect_cap_and_hold_text_and_code():
    cap = 128 * 1024
    documents = builtin_documents(cap)
    assert sum(len(d.encode("utf-8")) for d in documents) <= cap
    text = "".join(documents)
    assert "def " in text  # stdlib source
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    assert documents[0] == topics[sorted(topics)[0]]


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "héllo → wörld"
    ids = tokenizer.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(np.concatenate([ids, [tokenizer.eos_id]])) == text
    stream = tokenize_documents(["ab", "c"], tokenizer)
    np.testing.assert_array_equal(stream, [97, 98, 257, 99, 257])


# --- iterator ---------------------------------------------------------------


def test_iterator_batches_are_shifted_windows(small_stream):
    batch = next(make_iterator(small_stream))
    assert batch["inputs"].shape == (4, 8) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # Each row is a contiguous slice of the stream.
    for row_in, row_target in zip(batch["inputs"], batch["targets"]):
        start = int(row_in[0])
        np.testing.assert_array_equal(row_in, small_stream[start : start + 8])
        np.testing.assert_array_equal(row_target, small_stream[start + 1 : start + 9])


def test_iterator_order_depends_only_on_seed(small_stream):
    assert_same_batches(
        take(make_iterator(small_stream, seed=3), 5), take(make_iterator(small_stream, seed=3), 5)
    )
    a = take(make_iterator(small_stream, seed=3), 5)
    b = take(make_iterator(small_stream, seed=4), 5)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_epoch_visits_each_window_once_then_reshuffles(small_stream):
    iterator = make_iterator(small_stream, batch=4, seq=8)
    per_epoch = iterator.batches_per_epoch
    starts = np.concatenate([b["inputs"][:, 0] for b in take(iterator, per_epoch)])
    assert len(set(starts.tolist())) == len(starts)
    assert iterator.get_state()["epoch"] == 0
    next(iterator)
    assert iterator.get_state()["epoch"] == 1


def test_state_restore_continues_same_stream(small_stream):
    # 1000 tokens / seq 8 = ~124 windows, 31 batches of 4: 40 batches crosses an epoch.
    for k in (0, 3, 30, 31):
        original = make_iterator(small_stream, seed=7)
        take(original, k)
        state = original.get_state()
        assert all(type(v) is int for v in state.values())
        expected = take(original, 10)
        resumed = make_iterator(small_stream, seed=0)  # seed comes from the state
        resumed.set_state(json.loads(json.dumps(state)))  # survives a JSON checkpoint
        assert_same_batches(take(resumed, 10), expected)


def test_process_shards_partition_the_global_batch(small_stream):
    whole = take(make_iterator(small_stream, batch=6, seed=1), 3)
    shards = [
        take(make_iterator(small_stream, batch=6, seed=1, index=p, count=3), 3) for p in range(3)
    ]
    for step, batch in enumerate(whole):
        for key in ("inputs", "targets"):
            local = [shard[step][key] for shard in shards]
            assert all(x.shape == (2, 8) for x in local)
            np.testing.assert_array_equal(np.concatenate(local), batch[key])


def test_iterator_errors(small_stream):
    with pytest.raises(ValueError, match="process_count"):
        make_iterator(small_stream, batch=4, count=3)
    with pytest.raises(ValueError, match="too long"):
        make_iterator(small_stream, seq=600)
    with pytest.raises(ValueError, match="global_batch_size"):
        make_iterator(small_stream, batch=200, seq=8)
    with pytest.raises(ValueError, match="lacks"):
        make_iterator(small_stream).set_state({"epoch": 0})


def test_eval_batches_are_fixed(small_stream):
    batches = list(eval_batches(small_stream, 4, 8, max_batches=3))
    assert len(batches) == 3
    assert_same_batches(batches, list(eval_batches(small_stream, 4, 8, max_batches=3)))
    np.testing.assert_array_equal(batches[0]["inputs"][1], small_stream[8:16])
    np.testing.assert_array_equal(batches[2]["targets"][3], small_stream[89:97])
    assert len(list(eval_batches(small_stream, 4, 8))) == 999 // 8 // 4
    halves = [
        next(eval_batches(small_stream, 4, 8, process_index=p, process_count=2)) for p in range(2)
    ]
    np.testing.assert_array_equal(
        np.concatenate([h["inputs"] for h in halves]), batches[0]["inputs"]
    )
    with pytest.raises(ValueError, match="too short"):
        eval_batches(small_stream[:20], 4, 8)


# --- user data ----------------------------------------------------------------


def test_text_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second doc", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first doc", encoding="utf-8")
    data = load_tokens({"source": "text", "path": str(tmp_path), "val_fraction": 0.25})
    stream = np.concatenate([data.train, data.val])
    assert ByteTokenizer().decode(stream) == "first docsecond doc"
    assert (stream == ByteTokenizer.eos_id).sum() == 2
    assert data.skipped_files == 0
    single = load_tokens({"source": "text", "path": tmp_path / "a.txt"})
    assert len(single.train) + len(single.val) == len("first doc") + 1


def test_text_directory_reads_any_extension_and_skips_binary_files(tmp_path):
    """A directory of .md / extension-less files is a corpus (not only *.txt):
    recursive, in sorted path order; binary files are skipped and counted, and
    the data line of the run says so."""
    (tmp_path / "notes.md").write_text("# notes\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README").write_text("no extension\n", encoding="utf-8")
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # NUL bytes
    (tmp_path / "latin1.dat").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (tmp_path / ".hidden").write_text("left out", encoding="utf-8")
    (tmp_path / "code.py").write_text("print('hi')\n", encoding="utf-8")
    data = load_tokens({"source": "text", "path": str(tmp_path), "val_fraction": 0.25})
    stream = np.concatenate([data.train, data.val])
    documents = ByteTokenizer().decode(stream)
    assert documents == "print('hi')\n# notes\nno extension\n"  # code.py, notes.md, sub/README
    assert data.skipped_files == 2
    again = load_tokens({"source": "text", "path": str(tmp_path), "val_fraction": 0.25})
    np.testing.assert_array_equal(np.concatenate([again.train, again.val]), stream)

    from tasks.registry import load_config

    (tmp_path / "long.md").write_text("lorem ipsum dolor sit amet " * 200, encoding="utf-8")
    config = load_config(
        "configs/llama_tiny.yaml",
        ["data.source=text", f"data.path={tmp_path}", "seq_len=16", "batch_size=2"],
    )
    assert "| 2 binary file(s) skipped" in config.build_task().description


def test_jsonl_with_custom_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["one", "two", "three"]))
        + "\n\n"
    )
    data = load_tokens(
        {"source": "jsonl", "path": path, "jsonl_field": "body", "val_fraction": 0.2}
    )
    stream = np.concatenate([data.train, data.val])
    assert ByteTokenizer().decode(stream) == "onetwothree"
    with pytest.raises(ValueError, match="'text'"):
        load_tokens({"source": "jsonl", "path": path})


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_pretokenized_bin(tmp_path, dtype):
    tokens = (np.arange(500) * 7 % 1000).astype(dtype)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    data = load_tokens(
        {
            "source": "bin",
            "path": str(path),
            "bin_dtype": dtype,
            "vocab_size": 1000,
            "val_fraction": 0.1,
        }
    )
    assert isinstance(data.train, np.memmap) and data.vocab_size == 1000
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), tokens)
    assert len(data.val) == 50
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_tokens({"source": "bin", "path": str(path), "bin_dtype": dtype})


def test_config_object_is_accepted(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")

    class Config:  # attribute access, like training.config.TextDataConfig
        source, path, tokenizer, val_fraction = "text", str(tmp_path), "byte", 0.5
        max_corpus_bytes = None

    assert load_tokens(Config()).vocab_size == 259


def test_missing_path_and_empty_corpus(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_tokens({"source": "text", "path": str(missing)})
    with pytest.raises(ValueError, match="corpus is empty"):
        load_tokens({"source": "text", "path": str(tmp_path)})  # no .txt files
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_tokens({"source": "text", "path": str(tmp_path / "empty.txt")})
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_tokens({"source": "bin", "path": str(tmp_path / "empty.bin")})
    with pytest.raises(ValueError, match="source"):
        load_tokens({"source": "parquet", "path": str(tmp_path)})


def test_hf_tokenizer_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokens({"tokenizer": str(tokenizer_file), **SMALL_CORPUS})
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokens({"tokenizer": str(tmp_path / "missing.json"), **SMALL_CORPUS})


def test_hf_tokenizer_is_used_when_available(tmp_path, monkeypatch):
    """Plumbing check with a stand-in `tokenizers` module (one id per word)."""
    words = {"<|endoftext|>": 0, "alpha": 1, "beta": 2}

    class FakeTokenizer:
        @staticmethod
        def from_file(path):
            return FakeTokenizer()

        def get_vocab_size(self, with_added_tokens=True):
            return 70000  # > uint16: the stream must widen to uint32

        def token_to_id(self, token):
            return words.get(token)

        def encode_batch(self, texts, add_special_tokens=False):
            return [
                types.SimpleNamespace(ids=[words[w] + 65535 * (w == "beta") for w in t.split()])
                for t in texts
            ]

    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTokenizer))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "doc.txt").write_text("alpha beta alpha")
    data = load_tokens(
        {
            "source": "text",
            "path": str(tmp_path / "doc.txt"),
            "tokenizer": str(tmp_path / "tokenizer.json"),
            "val_fraction": 0.25,
        }
    )
    assert data.vocab_size == 70000 and data.train.dtype == np.uint32
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), [1, 65537, 1, 0])
