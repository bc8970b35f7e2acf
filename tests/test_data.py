import os
import time

import numpy as np
import pytest

from research.config import DataConfig
from research.data.corpus import CorpusNotFoundError, resolve_corpus
from research.data.documents import dedup_train, split_documents
from research.data.loader import eval_batches, train_dataset
from research.data.shards import prepare
from research.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

TEXT = "ROMEO:\nBut soft, what light.\n\nJULIET:\nAy me!\n\nROMEO:\nBut soft, what light.\n\n"


def test_char_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer.train(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").decode(tok.encode("ROMEO")) == "ROMEO"
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.encode("Z")


def test_bpe_tokenizer_round_trip(tmp_path):
    corpus = [TEXT * 20, "Wherefore art thou Romeo? Deny thy father and refuse thy name."]
    tok = BPETokenizer.train(iter(corpus), vocab_size=300)
    sample = "But soft, what light — ünïcode too.\n"
    assert tok.decode(tok.encode(sample)) == sample  # byte-level: nothing is unknown
    assert len(tok.encode("But soft, what light.")) < len("But soft, what light.")
    tok.save(tmp_path / "bpe.json")
    assert load_tokenizer(tmp_path / "bpe.json").decode(tok.encode(sample)) == sample


def test_dedup_drops_exact_duplicates_and_val_overlap():
    train = split_documents(TEXT + "Exit.\n\nAy me!\n\n", "\n\n")
    kept, report = dedup_train(train, val_docs=["Exit."])
    assert report.documents == 5
    assert report.duplicates_dropped == 1  # the second ROMEO speech
    assert report.val_overlap_dropped == 1  # "Exit." is in validation
    assert kept == ["ROMEO:\nBut soft, what light.", "JULIET:\nAy me!", "Ay me!"]


def test_prepare_writes_shards_and_is_cached(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 50 + "the end\n")
    cfg = DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, verbose=False)
    meta = data.meta
    assert meta["dedup"]["duplicates_dropped"] > 0
    train, val = data.tokens("train"), data.tokens("val")
    tok = data.tokenizer()
    assert tok.decode(val).endswith("the end\n")
    assert len(train) == meta["splits"]["train"]["tokens"] and len(val) > 0
    stamp = os.path.getmtime(data.path / "meta.json")
    start = time.perf_counter()
    again = prepare(cfg, verbose=False)
    assert again.path == data.path and os.path.getmtime(again.path / "meta.json") == stamp
    assert time.perf_counter() - start < 0.5


def test_missing_corpus_names_places_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_DATA", str(tmp_path))
    with pytest.raises(CorpusNotFoundError) as error:
        resolve_corpus("no_such_corpus")
    assert str(tmp_path) in str(error.value) and "--set data.corpus" in str(error.value)


def test_research_data_env_is_searched(tmp_path, monkeypatch):
    (tmp_path / "mini").mkdir()
    (tmp_path / "mini" / "a.txt").write_text("hello")
    monkeypatch.setenv("RESEARCH_DATA", str(tmp_path))
    assert resolve_corpus("mini") == [tmp_path / "mini" / "a.txt"]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_pipeline_is_deterministic_and_resumable():
    tokens = np.arange(5000, dtype=np.uint16)
    first = _take(iter(train_dataset(tokens, 16, 4, seed=3)), 5)
    second = _take(iter(train_dataset(tokens, 16, 4, seed=3)), 5)
    other = _take(iter(train_dataset(tokens, 16, 4, seed=4)), 5)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert first[0].shape == (4, 17)
    assert np.array_equal(first[0][:, 1:], first[0][:, :-1] + 1)  # windows are contiguous

    iterator = iter(train_dataset(tokens, 16, 4, seed=3))
    _take(iterator, 2)
    state = iterator.get_state()
    expected = _take(iterator, 3)
    resumed = iter(train_dataset(tokens, 16, 4, seed=3))
    resumed.set_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, _take(resumed, 3), strict=True))


def test_processes_read_disjoint_windows():
    tokens = np.arange(3000, dtype=np.uint16)
    starts = []
    for process in range(2):
        batches = _take(
            iter(train_dataset(tokens, 8, 5, seed=0, process_index=process, process_count=2)), 10
        )
        starts.append({int(row[0]) for batch in batches for row in batch})
    assert not starts[0] & starts[1]


def test_global_batches_do_not_depend_on_the_process_count():
    """35 windows, global batches of 6: epochs end mid-batch. Over 3 epochs, the union of every
    global step's rows from 2 or 3 processes is the 1-process batch."""
    tokens = np.arange(40, dtype=np.uint16)  # seq_len 4: 35 windows
    steps = 18  # 108 windows: past the end of the third epoch

    def global_batches(process_count):
        local = 6 // process_count
        iterators = [
            iter(
                train_dataset(
                    tokens, 4, local, seed=1, process_index=p, process_count=process_count
                )
            )
            for p in range(process_count)
        ]
        return [np.concatenate([next(it) for it in iterators]) for _ in range(steps)]

    single = global_batches(1)
    starts = np.concatenate(single)[:, 0]
    for epoch in range(3):  # each epoch is a permutation of all windows
        assert sorted(starts[35 * epoch : 35 * (epoch + 1)].tolist()) == list(range(35))
    for process_count in (2, 3):
        for step, (a, b) in enumerate(zip(single, global_batches(process_count), strict=True)):
            assert sorted(a[:, 0].tolist()) == sorted(b[:, 0].tolist()), (process_count, step)


def test_eval_batches_cover_the_split_once():
    tokens = np.arange(103, dtype=np.uint16)
    seen, rows_total = [], 0
    for batch, rows in eval_batches(tokens, seq_len=10, batch_size=4):
        assert batch.shape == (4, 11)
        seen.extend(batch[:rows, :-1].ravel().tolist())
        rows_total += rows
    assert rows_total == 10 and seen == list(range(100))


def test_known_corpus_download_is_checked_against_sha256(tmp_path, monkeypatch):
    import hashlib

    from research.data import corpus as corpus_module

    source = tmp_path / "remote.txt"
    source.write_text("some public text\n")
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setattr(corpus_module, "_candidates", lambda name: [])
    monkeypatch.setitem(
        corpus_module.KNOWN_CORPORA,
        "remote",
        corpus_module.KnownCorpus(source.as_uri(), good, "remote.txt"),
    )
    files = resolve_corpus("remote", cache_dir=str(tmp_path / "cache"))
    assert files[0].read_text() == "some public text\n"

    monkeypatch.setitem(
        corpus_module.KNOWN_CORPORA,
        "tampered",
        corpus_module.KnownCorpus(source.as_uri(), "0" * 64, "t.txt"),
    )
    with pytest.raises(CorpusNotFoundError, match="sha256"):
        resolve_corpus("tampered", cache_dir=str(tmp_path / "cache"))
