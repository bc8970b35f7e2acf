"""Compact dedup (research/data/dedup.py) against Python references, exact Jaccard and
datasketch's LSH."""

import json
import os

import numpy as np

import research.data.dedup as dedup
from research.data.dedup import (
    NUM_PERM,
    SCHEME,
    SHINGLE_WORDS,
    Dedup,
    KeySet,
    band_keys,
    band_shape,
    minhashes,
    shingle_hashes,
)

WORDS = "the of and to in a is that for it as was with be by on not he this are or his".split()
VOCAB = [f"w{i}" for i in range(3000)]  # enough words that a document's shingles rarely repeat


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 80))) for _ in range(n)]


def _shingles(text: str) -> list[tuple[bytes, ...]]:
    """The obviously-right reference: lowercase UTF-8 words split at ASCII whitespace, then
    every 5 consecutive words (a text of k < 5 words: one shingle of them all)."""
    words = text.lower().encode().split()
    n = SHINGLE_WORDS
    return [tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]


def _jaccard(a: str, b: str) -> float:
    x, y = set(_shingles(a)), set(_shingles(b))
    return len(x & y) / len(x | y)


def _edited(rng, words: list[str], changes: int) -> str:
    words = list(words)
    for at in rng.choice(len(words), changes, replace=False):
        words[at] = f"edit{rng.integers(1 << 30)}"
    return " ".join(words)


def test_shingle_hashes_are_one_to_one_with_the_reference_shingles():
    """Every 5-gram of words (with case, Unicode and every kind of whitespace) maps to one
    hash, distinct 5-grams to distinct hashes, whatever batch the text is in."""
    rng = np.random.default_rng(0)
    pieces = [*WORDS, "The", "THE", "école", "ÉCOLE", "Σας", "a\xa0b", "x\x1cy", "日本語", "-"]
    gaps = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", " \n\t "]
    texts = ["", " \n ", "one", "Two words", "a b c d e", "a b c d e f"]
    for _ in range(120):
        k = int(rng.integers(1, 40))
        gap = rng.choice(gaps, k)
        texts.append("".join(f"{w}{g}" for w, g in zip(rng.choice(pieces, k), gap, strict=True)))
    hashes, starts = shingle_hashes(texts)
    ends = [*starts[1:], len(hashes)]
    seen: dict = {}
    for text, lo, hi in zip(texts, starts, ends, strict=True):
        reference = _shingles(text)
        assert hi - lo == len(reference), text
        for shingle, h in zip(reference, hashes[lo:hi].tolist(), strict=True):
            assert seen.setdefault(shingle, h) == h
    assert len(set(seen.values())) == len(seen) > 500  # no two shingles share a hash
    alone = shingle_hashes(texts[40:41])[0]
    np.testing.assert_array_equal(alone, hashes[starts[40] : ends[40]])


def test_estimated_jaccard_is_within_the_minhash_error_of_the_exact_one():
    """On 300 pairs from unrelated to identical, the fraction of equal signature entries
    estimates the exact Jaccard of the reference shingle sets: unbiased, and within two
    standard errors (sqrt(J(1-J)/64)) for ~95% of pairs with that variance, as MinHash promises."""
    rng = np.random.default_rng(1)
    firsts, seconds, exact = [], [], []
    for i in range(300):
        words = list(rng.choice(VOCAB, int(rng.integers(30, 300))))
        changes = int(rng.integers(0, len(words) // 3)) if i % 10 else len(words)
        firsts.append(" ".join(words))
        seconds.append(_edited(rng, words, changes))
        exact.append(_jaccard(firsts[-1], seconds[-1]))
    exact = np.array(exact)
    estimate = (minhashes(firsts) == minhashes(seconds)).mean(axis=1)
    error = estimate - exact
    within = np.abs(error) <= 2 * np.sqrt(exact * (1 - exact) / NUM_PERM) + 1 / NUM_PERM
    assert exact.min() == 0 and exact.max() > 0.9 and np.ptp(exact) > 0.9  # the whole range
    assert within.mean() >= 0.9, within.mean()
    assert abs(error.mean()) < 0.015  # no bias (the standard error of this mean is ~0.004)
    variance = exact * (1 - exact) / NUM_PERM
    assert (error**2).sum() / variance.sum() < 1.5  # independent permutations: ratio ~1


def test_planted_near_duplicates_are_flagged_and_unrelated_documents_are_not(monkeypatch):
    """Copies edited to a known Jaccard among unrelated documents: exact copies up to case and
    whitespace are always caught, copies at J >= 0.96 nearly always (the LSH curve at 5 bands
    of 11 rows: >= 99.3% each), copies at J <= 0.5 and unrelated documents never here."""
    rng = np.random.default_rng(2)
    originals = [list(rng.choice(VOCAB, 500)) for _ in range(80)]
    texts, kind, jaccards = [], [], []
    for words in originals:
        texts.append(" ".join(words))
        kind.append("original")
        jaccards.append(0.0)
    for i, words in enumerate(originals):
        if i % 4 == 0:
            copy = "\n".join(words).upper()  # identical up to case and whitespace
            kind.append("same")
        elif i % 4 == 1:
            copy = _edited(rng, words, 120)  # J < 0.5
            kind.append("far")
        else:
            copy = _edited(rng, words, int(rng.integers(1, 3)))  # J ~ 0.96-0.98
            kind.append("near")
        texts.append(copy)
        jaccards.append(_jaccard(" ".join(words), copy))
    kind, jaccards = np.array(kind), np.array(jaccards)
    state, keys = Dedup(near=True), band_keys(minhashes(texts), 0.8)
    monkeypatch.setattr(dedup, "GROUP_CHARS", 5000)  # texts hashed in groups of ~2: the same
    np.testing.assert_array_equal(band_keys(minhashes(texts), 0.8), keys)
    flagged = np.concatenate([state.near_dups(keys[i : i + 16]) for i in range(0, len(texts), 16)])
    assert jaccards[kind == "near"].min() >= 0.96 and jaccards[kind == "far"].max() < 0.5
    assert flagged[kind == "same"].all()
    assert flagged[kind == "near"].mean() >= 0.9
    assert not flagged[(kind == "far") | (kind == "original")].any()


def test_signatures_are_the_same_in_every_worker_process(monkeypatch):
    """The same document gets the same band keys in spawned tokenizer workers with another
    PYTHONHASHSEED, in any batch and any worker, as in this process."""
    from tokenizers import Tokenizer, models

    from research.data.stream import _Processes, _work

    texts = [" ".join(np.random.default_rng(i).choice(VOCAB, 50)) for i in range(12)]
    expected = band_keys(minhashes(texts), 0.8)
    monkeypatch.setenv("PYTHONHASHSEED", "12345")  # the spawned workers' string hashes differ
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).to_str()
    with _Processes(2, tok, band_shape(0.8)) as pool:
        results = [pool.apply_async(_work, (batch,)) for batch in (texts, texts[::-1], texts[5:])]
        got = [r.get()[2] for r in results]
    np.testing.assert_array_equal(got[0], expected)
    np.testing.assert_array_equal(got[1], expected[::-1])
    np.testing.assert_array_equal(got[2], expected[5:])
    assert os.environ["PYTHONHASHSEED"] == "12345"


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
