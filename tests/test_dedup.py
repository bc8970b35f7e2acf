"""Compact dedup (research/data/dedup.py) against datasketch's objects and Python sets."""

import json
import zlib

import numpy as np

from research.data.dedup import (
    NUM_PERM,
    SCHEME,
    Dedup,
    KeySet,
    band_keys,
    band_shape,
    minhashes,
    shingles,
)

WORDS = "the of and to in a is that for it as was with be by on not he this are or his".split()


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 80))) for _ in range(n)]


def test_vectorised_minhashes_equal_datasketchs_per_document_objects(monkeypatch):
    from datasketch import MinHash

    import research.data.dedup as dedup

    texts = [*_texts(40), "", "one", "Five Words Exactly Here Now"]
    monkeypatch.setattr(dedup, "CHUNK", 100)  # many chunks, documents bigger than one
    reference = MinHash.bulk(
        [shingles(t) for t in texts], num_perm=NUM_PERM, hashfunc=zlib.crc32, scheme=SCHEME
    )
    np.testing.assert_array_equal(minhashes(texts), np.stack([m.hashvalues for m in reference]))


def test_near_dups_flag_what_datasketchs_lsh_would_query_in_stream_order():
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    rng = np.random.default_rng(1)
    originals = [" ".join(rng.choice(WORDS, 200)) for _ in range(60)]
    texts = []
    for text in originals:  # each original, then a copy with 0 to 15 words changed
        words = text.split()
        for _ in range(int(rng.integers(0, 16))):
            words[int(rng.integers(len(words)))] = "CHANGED"
        texts += [text, " ".join(words)]
    signatures = minhashes(texts)
    lsh, expected = MinHashLSH(threshold=0.8, num_perm=NUM_PERM), []
    for i, sig in enumerate(signatures):
        mh = LeanMinHash(MinHash(NUM_PERM, hashvalues=sig, scheme=SCHEME))
        expected.append(bool(lsh.query(mh)))
        if not expected[-1]:
            lsh.insert(i, mh)
    state = Dedup(near=True)
    keys = band_keys(signatures, 0.8)
    ours = np.concatenate([state.near_dups(keys[i : i + 7]) for i in range(0, len(keys), 7)])
    assert ours.tolist() == expected and 10 < sum(expected) < 60  # some, not all, caught
    assert (lsh.b, lsh.r) == band_shape(0.8)


def test_keyset_and_exact_dups_agree_with_a_python_set():
    rng = np.random.default_rng(3)
    keys, reference = KeySet(), set()
    for _ in range(40):
        batch = rng.integers(0, 500, int(rng.integers(0, 30))).astype(np.uint64)
        probe = rng.integers(0, 500, 50).astype(np.uint64)
        assert keys.contains(probe).tolist() == [int(p) in reference for p in probe]
        keys.add(batch)
        reference.update(batch.tolist())
    assert len(keys.runs) <= 8  # merged as it grew
    state, seen, expected = Dedup(near=False), set(), []
    digests = [bytes([int(d)]) * 16 for d in rng.integers(0, 30, 100)]
    for d in digests:
        expected.append(d in seen)
        seen.add(d)
    got = np.concatenate([state.exact_dups(digests[i : i + 9]) for i in range(0, 100, 9)])
    assert got.tolist() == expected and state.counts["exact"] == sum(expected)


def test_near_copies_many_shards_apart_are_removed(tmp_path):
    """The index is global within a part: a near copy in the last file meets its original
    from the first file several shards later (and after a resume, from the shard sidecars)."""
    from research.config import DataConfig
    from research.data.stream import StreamData, prepare_stream

    rng = np.random.default_rng(4)
    folder = tmp_path / "c"
    folder.mkdir()
    long_docs = [" ".join(rng.choice(WORDS, 300)) + f" long{i}" for i in range(6)]
    for f in range(4):
        with open(folder / f"f{f}.jsonl", "w") as handle:
            for text in _texts(30, seed=10 + f) + (long_docs if f == 0 else []):
                handle.write(json.dumps({"text": text + f" f{f}"}) + "\n")
    with open(folder / "f3.jsonl", "a") as handle:
        for text in long_docs:
            words = (text + " f0").split()
            words[int(rng.integers(len(words)))] = "CHANGED"
            handle.write(json.dumps({"text": " ".join(words)}) + "\n")
    cfg = DataConfig(sources=str(folder), tokenizer="bpe", bpe_vocab_size=300, shard_tokens=800,
                     cache_dir=str(tmp_path / "cache"), workers=1, val_fraction=0.0)  # fmt: skip
    data = StreamData.open(prepare_stream(cfg, verbose=False))
    assert len(data.shards("train")) >= 8
    assert data.parts[0]["removed"]["train"] == {"exact": 0, "near": 6}
