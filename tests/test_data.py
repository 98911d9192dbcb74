"""Data pipeline: sources, split, FIM, shards, caching, atomic builds, batches, unigram baseline.

A toy byte-level tokenizer stands in for the real one: byte b -> id b + OFFSET, with the special
ids below OFFSET, so every stream can be decoded back to text by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import string
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3.data import (
    Corpus, DataError, Document, PackedBatches, TokenDataset, build_dataset, default_corpus_files,
    encode_documents, fim_rng, fim_split, iter_documents, split_of, unigram_entropy, val_batches,
)

EOS, FIM_BEGIN, FIM_HOLE, FIM_END = 1, 3, 4, 5
FIM_IDS = (FIM_BEGIN, FIM_HOLE, FIM_END)
OFFSET = 8
VOCAB = 256 + OFFSET


def enc(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode("utf-8")]


def dec(ids) -> str:
    return bytes(int(i) - OFFSET for i in ids).decode("utf-8")


def encode_batch(texts: list[str]) -> list[list[int]]:
    return [enc(t) for t in texts]


def make_docs(n: int, seed: int = 0, min_len: int = 5, max_len: int = 60) -> list[Document]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + " \n" + "éλ→"  # multi-byte characters exercise char-level FIM
    return [Document(f"doc{i}.txt", "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))))
            for i in range(n)]


def build(out, docs, **kw):
    kw = {"progress": False, **kw}
    return build_dataset(out, docs, kw.pop("encode_batch", encode_batch), EOS, kw.pop("vocab_size", VOCAB), **kw)


def split_docs(stream: np.ndarray) -> list[np.ndarray]:
    """The documents of a stream, by cutting after every EOS (EOS dropped)."""
    cuts = np.flatnonzero(stream == EOS)
    assert len(stream) == 0 or cuts[-1] == len(stream) - 1, "stream must end with EOS"
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [stream[s:e] for s, e in zip(starts, cuts)]


# ------------------------------------------------------------------------------------- sources
def test_default_corpus_is_sorted_stdlib_without_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = default_corpus_files()
    assert len(files) > 100
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    assert not any(part in ("site-packages", "dist-packages") for r in rel for part in r.split("/"))
    assert "os.py" in rel and "json/decoder.py" in rel
    splits = {split_of(r) for r in rel}
    assert splits == {"train", "val"}
    assert 0 < sum(split_of(r) == "val" for r in rel) < 0.1 * len(rel)
    # Documents carry the relative path as their id, in the same order.
    first = list(itertools.islice(iter_documents(None), 5))
    nonblank = (r for r in rel if (root / r).read_bytes().strip())
    assert [d.doc_id for d in first] == list(itertools.islice(nonblank, 5))


def test_split_is_stable_and_close_to_fraction():
    ids = [f"dir/file_{i}.py" for i in range(20000)]
    a = [split_of(i, 0.1) for i in ids]
    assert a == [split_of(i, 0.1) for i in reversed(ids)][::-1]  # order independent
    frac = a.count("val") / len(a)
    assert 0.09 < frac < 0.11
    assert {split_of(i, 0.0) for i in ids[:500]} == {"train"}
    assert {split_of(i, 1.0) for i in ids[:500]} == {"val"}
    # A larger fraction only moves documents from train to val.
    assert all(split_of(i, 0.3) == "val" for i, s in zip(ids, a) if s == "val")
    with pytest.raises(DataError):
        split_of("x", 1.5)


def test_sources_dir_text_jsonl(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "b.txt").write_text("bee")
    (d / "sub" / "a.md").write_text("# a")
    (d / "sub" / "bad.py").write_bytes(b"ok \xff\xfe end")  # invalid UTF-8 -> replacement chars
    (d / "binary.txt").write_bytes(b"abc\0def")  # NUL byte: skipped in a directory
    (d / "image.png").write_bytes(b"not text")  # extension not in the list
    (d / "empty.txt").write_text("  \n")  # whitespace only: skipped
    (d / ".git" / "config.txt").write_text("hidden")
    (d / "rows.jsonl").write_text('{"text": "row one"}\n\n{"text": ""}\n{"text": "row four", "x": 1}\n')
    single = tmp_path / "notes.weird"
    single.write_text("any extension")

    docs = list(iter_documents([d, single]))
    assert [x.doc_id for x in docs] == ["b.txt", "rows.jsonl:1", "rows.jsonl:4", "sub/a.md", "sub/bad.py",
                                       "notes.weird"]
    texts = {x.doc_id: x.text for x in docs}
    assert texts["rows.jsonl:4"] == "row four" and texts["notes.weird"] == "any extension"
    assert texts["sub/bad.py"] == "ok \ufffd\ufffd end"
    # A single path (not a list) works too, and a file given by name is read whatever it is.
    assert [x.text for x in iter_documents(single)] == ["any extension"]
    # Corpus re-reads its sources on every pass, so a build can stream it twice.
    corpus = Corpus([d])
    assert list(corpus) == list(corpus) == docs[:-1]
    ds = build(tmp_path / "ds", corpus, val_fraction=0.0)
    assert ds.num_docs("train") == len(docs) - 1


def test_source_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        iter_documents([tmp_path / "nope.txt"])  # checked at call time, before any document
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    it = iter_documents([bad])
    assert next(it).text == "fine"
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*malformed JSON"):
        next(it)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"notext\.jsonl:1.*no 'text' field"):
        list(iter_documents([notext]))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "a"}\n{"text": "b"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"wrong\.jsonl:3"):
        list(iter_documents([wrong]))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\0\1\2")
    with pytest.raises(DataError, match="blob.bin"):
        list(iter_documents([binary]))


# ------------------------------------------------------------------------------------------ FIM
def test_fim_split_rate_and_reassembly():
    text = "héllo wörld, fill in the middle"
    assert all(fim_split(text, fim_rng(0, f"d{i}"), 0.0) is None for i in range(200))
    for i in range(200):
        parts = fim_split(text, fim_rng(0, f"d{i}"), 1.0)
        assert parts is not None and "".join(parts) == text
    # Reproducible from (seed, doc_id) alone; another seed changes the cut points.
    assert fim_split(text, fim_rng(3, "x"), 1.0) == fim_split(text, fim_rng(3, "x"), 1.0)
    cuts = {fim_split(text, fim_rng(s, "x"), 1.0) for s in range(20)}
    assert len(cuts) > 10
    hits = sum(fim_split(text, fim_rng(0, f"d{i}"), 0.1) is not None for i in range(5000))
    assert 400 < hits < 600


def test_encode_documents_psm_layout():
    docs = make_docs(50)
    out = encode_documents(docs, encode_batch, EOS, FIM_IDS, fim_rate=1.0, seed=7)
    for doc, (tokens, fim) in zip(docs, out):
        assert fim
        t = tokens.tolist()
        assert t[0] == FIM_BEGIN and t[-1] == EOS and t.count(EOS) == 1
        hole, end = t.index(FIM_HOLE), t.index(FIM_END)
        prefix, suffix, middle = dec(t[1:hole]), dec(t[hole + 1:end]), dec(t[end + 1:-1])
        assert prefix + middle + suffix == doc.text
    plain = encode_documents(docs, encode_batch, EOS, FIM_IDS, fim_rate=0.0)
    assert all(not fim and t.tolist() == enc(d.text) + [EOS] for d, (t, fim) in zip(docs, plain))
    # Independent of order and of batching.
    rev = encode_documents(docs[::-1], encode_batch, EOS, FIM_IDS, fim_rate=0.5, seed=7)[::-1]
    one = [encode_documents([d], encode_batch, EOS, FIM_IDS, fim_rate=0.5, seed=7)[0] for d in docs]
    fwd = encode_documents(docs, encode_batch, EOS, FIM_IDS, fim_rate=0.5, seed=7)
    assert 0 < sum(f for _, f in fwd) < len(docs)
    for (a, fa), (b, fb), (c, fc) in zip(fwd, rev, one):
        assert fa == fb == fc and np.array_equal(a, b) and np.array_equal(a, c)


def test_build_fim_rates(tmp_path):
    docs = make_docs(40)
    ds0 = build(tmp_path / "r0", docs, fim_ids=FIM_IDS, fim_rate=0.0, val_fraction=0.2)
    for split in ("train", "val"):
        stream = np.asarray(ds0.tokens(split))
        assert not np.isin(stream, FIM_IDS).any()
    ds1 = build(tmp_path / "r1", docs, fim_ids=FIM_IDS, fim_rate=1.0, val_fraction=0.2)
    by_text = {d.text for d in docs}
    for split in ("train", "val"):
        pieces = split_docs(np.asarray(ds1.tokens(split)))
        assert len(pieces) == ds1.num_docs(split) == ds1.meta["splits"][split]["num_fim_docs"]
        for p in pieces:
            t = p.tolist()
            assert t[0] == FIM_BEGIN
            hole, end = t.index(FIM_HOLE), t.index(FIM_END)
            assert dec(t[1:hole]) + dec(t[end + 1:]) + dec(t[hole + 1:end]) in by_text
    # Same inputs in another order: every document gets the same tokens.
    ds2 = build(tmp_path / "r2", docs[::-1], fim_ids=FIM_IDS, fim_rate=1.0, val_fraction=0.2)
    for split in ("train", "val"):
        a = split_docs(np.asarray(ds1.tokens(split)))
        b = split_docs(np.asarray(ds2.tokens(split)))[::-1]
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


# -------------------------------------------------------------------------------- packing/shards
def test_packing_counts_and_boundaries(tmp_path):
    docs = make_docs(60) + [Document("blank.txt", " \n ")]  # a blank document is skipped
    ds = build(tmp_path / "ds", docs, val_fraction=0.25)
    kept = docs[:-1]
    assert ds.num_tokens("train") + ds.num_tokens("val") == sum(len(enc(d.text)) + 1 for d in kept)
    for split in ("train", "val"):
        mine = [d for d in kept if split_of(d.doc_id, 0.25) == split]
        assert mine and ds.num_docs(split) == len(mine)
        pieces = split_docs(np.asarray(ds.tokens(split)))
        assert [dec(p) for p in pieces] == [d.text for d in mine]  # input order, EOS between
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["num_input_docs"] == len(docs)
    assert meta["splits"]["train"]["num_tokens"] == ds.num_tokens("train")


def test_shards_and_cross_boundary_windows(tmp_path):
    docs = make_docs(30)
    big = build(tmp_path / "one", docs, val_fraction=0.0)
    small = build(tmp_path / "many", docs, val_fraction=0.0, shard_tokens=37)
    shards = small.meta["splits"]["train"]["shards"]
    n = small.num_tokens("train")
    assert len(shards) == math.ceil(n / 37) > 3
    assert [s["num_tokens"] for s in shards[:-1]] == [37] * (len(shards) - 1)
    for s in shards:
        assert (tmp_path / "many" / s["file"]).stat().st_size == 2 * s["num_tokens"]
    assert [s["file"] for s in shards[:2]] == ["train_00000.bin", "train_00001.bin"]
    assert small.meta["splits"]["val"]["shards"] == [] and small.num_tokens("val") == 0
    full = np.asarray(big.tokens("train"))
    view = small.tokens("train")
    assert np.array_equal(np.asarray(view), full)
    for start, length in [(30, 20), (36, 2), (37, 37), (0, n), (n - 5, 5), (10, 100)]:
        assert np.array_equal(view.read(start, length), full[start:start + length])
    assert np.array_equal(view[30:50], full[30:50]) and view[-1] == full[-1] == EOS
    assert np.array_equal(view[5:90:7], full[5:90:7])
    with pytest.raises(IndexError):
        view.read(n - 1, 2)
    # Large vocabularies switch to uint32.
    wide = build(tmp_path / "wide", docs[:3], vocab_size=70000)
    assert wide.meta["dtype"] == "uint32" and wide.tokens("train").dtype.itemsize == 4


def test_out_of_vocab_token_is_rejected(tmp_path):
    with pytest.raises(DataError, match="outside"):
        build(tmp_path / "ds", make_docs(3), vocab_size=100)
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------ cache/atomicity
class CountingEncoder:
    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("tokenizer crashed")
        return encode_batch(texts)


def test_cache_reuse_and_rebuild(tmp_path):
    docs = make_docs(20)
    out = tmp_path / "ds"
    first = CountingEncoder()
    ds = build(out, docs, encode_batch=first, tokenizer_fingerprint="tok-v1")
    assert first.calls > 0
    again = CountingEncoder()
    ds2 = build(out, iter(docs), encode_batch=again, tokenizer_fingerprint="tok-v1")  # a generator too
    assert again.calls == 0 and ds2.fingerprint == ds.fingerprint
    changed = docs[:-1] + [Document(docs[-1].doc_id, docs[-1].text + "!")]
    for kwargs, new_docs in [({"tokenizer_fingerprint": "tok-v1"}, changed),
                             ({"tokenizer_fingerprint": "tok-v2"}, docs),
                             ({"tokenizer_fingerprint": "tok-v2", "seed": 1}, docs)]:
        enc_ = CountingEncoder()
        ds3 = build(out, new_docs, encode_batch=enc_, **kwargs)
        assert enc_.calls > 0 and ds3.fingerprint != ds.fingerprint
        ds = ds3
    # A damaged shard under a matching meta.json is rebuilt, not trusted.
    shard = out / ds.meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    enc_ = CountingEncoder()
    build(out, docs, encode_batch=enc_, tokenizer_fingerprint="tok-v2", seed=1)
    assert enc_.calls > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or old dirs left behind


def test_interrupted_build_leaves_nothing_complete(tmp_path):
    docs = make_docs(30)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="crashed"):
        build(out, docs, encode_batch=CountingEncoder(fail_after=1), batch_docs=8)
    assert not (out / "meta.json").exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError):
        TokenDataset(out)
    ds = build(out, docs, batch_docs=8, progress=True)  # progress bar on: must not break anything
    assert ds.num_docs("train") + ds.num_docs("val") == len(docs)
    # A crashing rebuild keeps the previous, complete dataset.
    with pytest.raises(RuntimeError):
        build(out, docs, seed=5, encode_batch=CountingEncoder(fail_after=0))
    assert TokenDataset(out).fingerprint == ds.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_refuses_to_replace_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="precious.txt"):
        build(out, make_docs(3))
    assert (out / "precious.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return build(tmp_path_factory.mktemp("packed") / "ds", make_docs(80, seed=1), val_fraction=0.2,
                 shard_tokens=301)


def window_index(ds, split, seq_len):
    view = ds.tokens(split)
    n = (len(view) - 1) // seq_len
    index = {view.read(k * seq_len, seq_len + 1).tobytes(): k for k in range(n)}
    assert len(index) == n  # random text: windows are distinct, so a row identifies its offset
    return index, n


def row_offsets(batch, index):
    return [index[row.numpy().astype(np.uint16).tobytes()] for row in batch]


def test_packed_batches_visit_every_window_once_per_epoch(packed):
    seq_len, bs = 16, 5
    index, n = window_index(packed, "train", seq_len)
    assert n % bs != 0  # batches straddle epochs
    it = PackedBatches(packed, bs, seq_len, seed=3)
    rows = []
    for _ in range(math.ceil(3 * n / bs)):
        b = next(it)
        assert b.shape == (bs, seq_len + 1) and b.dtype == torch.long
        rows += row_offsets(b, index)
    epochs = [rows[e * n:(e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])
    # Inputs/targets are the shifted window; a fresh iterator with the same seed repeats the stream.
    again = PackedBatches(packed, bs, seq_len, seed=3)
    assert torch.equal(next(again), next(PackedBatches(packed, bs, seq_len, seed=3)))
    assert not torch.equal(next(PackedBatches(packed, bs, seq_len, seed=4)),
                           next(PackedBatches(packed, bs, seq_len, seed=3)))


@pytest.mark.parametrize("where", ["mid_epoch", "before_epoch_boundary", "after_epoch_boundary"])
def test_packed_batches_resume_exactly(packed, where):
    seq_len, bs = 16, 5
    n = (packed.num_tokens("train") - 1) // seq_len
    assert n % bs != 0
    # Batch n // bs is the one that holds the end of epoch 0 and the start of epoch 1.
    skip = {"mid_epoch": 2, "before_epoch_boundary": n // bs, "after_epoch_boundary": n // bs + 1}[where]
    it = PackedBatches(packed, bs, seq_len, seed=9)
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    expected = [next(it) for _ in range(2 * n // bs + 3)]  # runs across at least two epoch boundaries
    resumed = PackedBatches(packed, bs, seq_len, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, (next(resumed) for _ in expected)))
    assert resumed.state_dict() == it.state_dict() and it.epoch >= 2
    with pytest.raises(DataError, match="seq_len"):
        PackedBatches(packed, bs, 8).load_state_dict(state)


def test_packed_batches_ranks_partition_the_global_batch(packed):
    single = PackedBatches(packed, 6, 16, seed=1)
    ranks = [PackedBatches(packed, 3, 16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        assert torch.equal(next(single), torch.cat([next(r) for r in ranks]))


def test_too_short_split_and_val_batches(packed):
    with pytest.raises(DataError, match="fewer than one window"):
        PackedBatches(packed, 2, packed.num_tokens("val"), split="val")
    a = val_batches(packed, 4, 16, max_batches=3)
    b = val_batches(packed, 4, 16, max_batches=3)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    view = packed.tokens("val")
    flat = torch.cat(a)
    for k in range(12):  # sequential windows from the start of the split
        assert flat[k].tolist() == view.read(k * 16, 17).tolist()
    n = (packed.num_tokens("val") - 1) // 16
    everything = val_batches(packed, 4, 16)
    assert sum(len(x) for x in everything) == n and all(x.shape[1] == 17 for x in everything)


# ------------------------------------------------------------------------------------ baseline
def test_unigram_baseline_matches_hand_computation(tmp_path):
    ids = {"a": 1, "b": 2}  # vocabulary: 0 = EOS, 1 = a, 2 = b, 3 = never seen

    def toy(texts):
        return [[ids[c] for c in t] for t in texts]

    train_id = next(f"t{i}" for i in range(100) if split_of(f"t{i}", 0.5) == "train")
    val_id = next(f"v{i}" for i in range(100) if split_of(f"v{i}", 0.5) == "val")
    ds = build_dataset(tmp_path / "u", [Document(train_id, "aab"), Document(val_id, "ab")], toy,
                       eos_id=0, vocab_size=4, val_fraction=0.5, progress=False)
    assert ds.tokens("train").read(0, 4).tolist() == [1, 1, 2, 0]
    # train counts (EOS, a, b, unseen) = (1, 2, 1, 0); add-one -> (2, 3, 2, 1) / 8.
    # val tokens a, b, EOS -> -(ln 3/8 + ln 2/8 + ln 2/8) / 3
    expected = -(math.log(3 / 8) + 2 * math.log(2 / 8)) / 3
    assert unigram_entropy(ds) == pytest.approx(expected, abs=1e-12)
