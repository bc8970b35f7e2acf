"""Streaming prepare: shards and manifest, resume, checksums, near-dup removal, parts."""

import json

import numpy as np
import pytest

from research.config import DataConfig
from research.data.corpus import DataError
from research.data.sources import copies, doc_hash, is_val
from research.data.stream import ShardWriter, StreamData, prepare_stream

WORDS = "the of and to in a is that for it as was with be by on not he this are or his".split()


def _corpus(folder, files=4, docs=60, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    texts = []
    for f in range(files):
        with open(folder / f"f{f}.jsonl", "w") as handle:
            for d in range(docs):
                text = " ".join(rng.choice(WORDS, rng.integers(20, 60))) + f" doc{f}x{d}"
                texts.append(text)
                handle.write(json.dumps({"text": text}) + "\n")
    return texts


def _cfg(tmp_path, folder, **kw):
    base = dict(
        sources=str(folder),
        tokenizer="bpe",
        bpe_vocab_size=300,
        shard_tokens=1500,
        cache_dir=str(tmp_path / "cache"),
        workers=1,
        val_fraction=0.1,
    )
    return DataConfig(**{**base, **kw})


def _all_docs(data, split):
    docs = []
    for shard in data.shards(split):
        tokens, offsets = data.tokens(shard), data.offsets(shard)
        docs += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return docs


@pytest.mark.parametrize(
    "workers",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # 2: spawned worker processes (~15 s to start)
)
def test_shards_hold_every_kept_document_once_with_eos_and_verify(tmp_path, workers):
    texts = _corpus(tmp_path / "c")
    cfg = _cfg(tmp_path, tmp_path / "c", workers=workers)
    data = StreamData.open(prepare_stream(cfg, verbose=False), verify=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.path / "tokenizer.json"))
    eos = data.parts[0]["eos_id"]
    train, val = _all_docs(data, "train"), _all_docs(data, "val")
    assert all(d[-1] == eos for d in train + val)
    decoded = {tok.decode(d[:-1]) for d in train} | {tok.decode(d[:-1]) for d in val}
    assert decoded == set(texts)  # every document once (the corpus has no duplicates)
    assert len(train) + len(val) == len(texts) and 0 < len(val) < len(texts) * 0.2
    assert len(data.shards("train")) > 3
    shard = data.shards("train")[1]
    with open(data.path / shard["file"], "r+b") as handle:  # damage one byte
        handle.seek(-1, 2)
        byte = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataError, match=shard["file"]):
        StreamData.open(data.path, verify=True)


@pytest.mark.parametrize("weight", ["", "*2"])  # *2: a shard never splits a weight's repeats
def test_an_interrupted_prepare_keeps_its_shards_and_resumes(tmp_path, monkeypatch, weight):
    _corpus(tmp_path / "c")
    sources = f"{tmp_path / 'c'}{weight}"
    whole = StreamData.open(prepare_stream(_cfg(tmp_path, sources), verbose=False))
    cfg = _cfg(tmp_path, sources, cache_dir=str(tmp_path / "other"))
    flush, calls = ShardWriter.flush, []

    def dying_flush(self):
        if self.prefix.startswith("train") and len(self.shards) == 2:
            raise KeyboardInterrupt  # killed while writing the third train shard
        calls.append(self.prefix)
        flush(self)

    monkeypatch.setattr(ShardWriter, "flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare_stream(cfg, verbose=False)
    monkeypatch.setattr(ShardWriter, "flush", flush)
    kept = sorted(p.name for p in (tmp_path / "other").rglob("train-*.npy"))
    assert len(kept) == 6  # two finished shards (tokens, index, dedup) survived
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "other").rglob("train-*.npy")}
    resumed = StreamData.open(prepare_stream(cfg, verbose=False), verify=True)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # not rewritten
    assert [s["sha256"] for s in resumed.shards("train")] == [
        s["sha256"] for s in whole.shards("train")
    ]
    assert resumed.parts[0]["removed"] == whole.parts[0]["removed"]
    docs = sum(s["docs"] for s in whole.shards("train"))
    assert resumed.parts[0]["repeats"] == whole.parts[0]["repeats"] == (docs // 2 if weight else 0)


def test_planted_duplicates_are_removed_and_counted(tmp_path):
    """Exact copies and near copies (one word of 400 changed: Jaccard ~0.97) of earlier
    documents, some of them validation documents, never reach train; the rest all do."""
    texts = _corpus(tmp_path / "c", files=2, docs=40)
    rng = np.random.default_rng(1)
    long_docs = [" ".join(rng.choice(WORDS, 400)) + f" long{i}" for i in range(12)]
    with open(tmp_path / "c" / "f0.jsonl", "a") as handle:
        for text in long_docs:
            handle.write(json.dumps({"text": text}) + "\n")
    with open(tmp_path / "c" / "f1.jsonl", "a") as handle:
        for text in texts[:10]:  # 10 exact copies
            handle.write(json.dumps({"text": text}) + "\n")
        for text in long_docs:  # 12 near copies
            words = text.split()
            words[int(rng.integers(len(words)))] = "CHANGED"
            handle.write(json.dumps({"text": " ".join(words)}) + "\n")
    data = StreamData.open(prepare_stream(_cfg(tmp_path, tmp_path / "c"), verbose=False))
    removed = data.parts[0]["removed"]
    # A copy of a validation document hashes into validation too: it is removed there.
    assert removed["train"]["exact"] + removed["val"]["exact"] == 10
    assert removed["train"]["near"] + removed["val"]["near"] == 12
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.path / "tokenizer.json"))
    kept = [tok.decode(d[:-1]) for d in _all_docs(data, "train") + _all_docs(data, "val")]
    assert sorted(kept) == sorted(texts + long_docs)


@pytest.mark.parametrize("weight", ["", "*1.5"])
def test_parts_are_pure_and_together_hold_the_single_process_documents(tmp_path, weight):
    _corpus(tmp_path / "c", files=5)
    sources = f"{tmp_path / 'c'}{weight}"
    one = StreamData.open(prepare_stream(_cfg(tmp_path, sources), verbose=False))
    cfg = _cfg(tmp_path, sources, cache_dir=str(tmp_path / "parts"))
    with pytest.raises(DataError, match="1 of 2 parts missing"):
        StreamData.open(prepare_stream(cfg, 1, 2, verbose=False))
    two = StreamData.open(prepare_stream(cfg, 0, 2, verbose=False), verify=True)
    assert two.parts[0]["files"] + two.parts[1]["files"] == one.parts[0]["files"]
    assert _all_docs(two, "val") == _all_docs(one, "val")  # no duplicates across parts here
    assert _all_docs(two, "train") == _all_docs(one, "train")
    assert sum(p["repeats"] for p in two.parts) == one.parts[0]["repeats"]
    again = _cfg(tmp_path, sources, cache_dir=str(tmp_path / "again"))
    prepare_stream(again, 1, 2, verbose=False)  # the same part, alone elsewhere: same bytes
    (folder,) = (tmp_path / "again" / "prepared").iterdir()
    assert [p.read_bytes() for p in sorted(folder.glob("train-p00001-*"))] == [
        p.read_bytes() for p in sorted(two.path.glob("train-p00001-*"))
    ]


def test_an_existing_tokenizer_json_is_loaded_with_its_bos_and_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = _corpus(tmp_path / "c", files=1, docs=30)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<s>", "</s>"]  # Llama 2's names: found by bos_token/eos_token="auto"
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = _cfg(tmp_path, tmp_path / "c", tokenizer_file=str(tmp_path / "tokenizer.json"))
    data = StreamData.open(prepare_stream(cfg, verbose=False))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    assert (data.parts[0]["bos_id"], data.parts[0]["eos_id"]) == (bos, eos)
    docs = _all_docs(data, "train") + _all_docs(data, "val")
    assert len(docs) == 30 and all(d[0] == bos and d[-1] == eos for d in docs)
    bare = _cfg(tmp_path, tmp_path / "c", tokenizer_file=str(tmp_path / "tokenizer.json"),
                eos_token="<|endoftext|>", cache_dir=str(tmp_path / "x"))  # fmt: skip
    with pytest.raises(DataError, match="no EOS token among <\\|endoftext\\|>"):
        prepare_stream(bare, verbose=False)


@pytest.mark.slow  # 40 s: datatrove starts its processes; the fast twin is the parts test
def test_datatrove_with_two_workers_gives_the_parts_run_one_after_another(tmp_path):
    pytest.importorskip("datatrove")
    from research.data.engine import prepare_with_datatrove

    _corpus(tmp_path / "c", files=4, docs=30)
    sources = f"{tmp_path / 'c'}*1.5"  # a weight's repeats too
    local = _cfg(tmp_path, sources, cache_dir=str(tmp_path / "local"))
    for part in range(2):
        path = prepare_stream(local, part, 2, verbose=False)
    engine = _cfg(tmp_path, sources, cache_dir=str(tmp_path / "engine"))
    out = prepare_with_datatrove(engine, 2, 2, tmp_path / "logs")
    assert out.name == path.name
    files = sorted(p.name for p in path.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    for name in files:
        if name.endswith(".npy") or name == "tokenizer.json":
            assert (out / name).read_bytes() == (path / name).read_bytes(), name
    a, b = StreamData.open(path, verify=True), StreamData.open(out, verify=True)
    assert [p["splits"] for p in a.parts] == [p["splits"] for p in b.parts]


def test_research_prepare_runs_one_part_and_refuses_a_char_tokenizer(tmp_path, capsys):
    from research.cli import main

    _corpus(tmp_path / "c", files=2, docs=20)
    common = ["--set", f"data.sources={tmp_path / 'c'}", "--set", "data.workers=1",
              "--set", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(["prepare", "tiny", *common]) == 2  # tiny's tokenizer is char
    assert "data.tokenizer=bpe or data.tokenizer_file" in capsys.readouterr().err
    bpe = [*common, "--set", "data.tokenizer=bpe", "--set", "data.bpe_vocab_size=300"]
    assert main(["prepare", "tiny", *bpe, "--num-shards", "2", "--shard-index", "1"]) in (0, None)
    assert "prepared part 1 of 2" in capsys.readouterr().out
    (folder,) = (tmp_path / "cache" / "prepared").iterdir()
    assert (folder / "part-00001-of-00002.json").exists()


def _near_copy(text, rng):
    words = text.split()
    words[int(rng.integers(len(words)))] = "CHANGED"
    return " ".join(words)


def _weighted_corpus(folder):
    """Sources a*2, b*1.5, c*0.5 (folders of JSONL) as ``data.sources``, and every document
    occurrence in stream order as (text, weight, original): a real duplicate's original is the
    text it copies (exactly, or one word of 400 changed). Planted: copies of a's documents in a
    second file of a and in b and c; a near copy of an a document in b; and a validation
    document of c (long) whose near copy sits in a's train split."""
    rng = np.random.default_rng(3)
    short = [" ".join(rng.choice(WORDS, rng.integers(20, 60))) + f" w{i}" for i in range(70)]
    long_docs = [" ".join(rng.choice(WORDS, 400)) + f" long{i}" for i in range(3)]
    val_long = next(t for i in range(200)
                    if is_val(doc_hash(t := " ".join(rng.choice(WORDS, 400)) + f" v{i}"), 0.1)
                    and not is_val(doc_hash(_near_copy(t, rng)), 0.1))  # fmt: skip
    leak = _near_copy(val_long, np.random.default_rng(3))
    while is_val(doc_hash(leak), 0.1):  # a train near copy of a validation document
        leak = _near_copy(val_long, rng)
    a0 = short[:30] + long_docs
    files = {
        "a/f0.jsonl": [(t, 2.0, t) for t in a0],
        "a/f1.jsonl": [(t, 2.0, t) for t in short[:3]] + [(leak, 2.0, val_long)]
        + [(t, 2.0, t) for t in short[30:40]],
        "b/f0.jsonl": [(t, 1.5, t) for t in short[40:55] + short[3:6]]
        + [(_near_copy(long_docs[0], rng), 1.5, long_docs[0])],
        "c/f0.jsonl": [(t, 0.5, t) for t in short[55:70] + short[6:12] + [val_long]],
    }  # fmt: skip
    for name, docs in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("".join(json.dumps({"text": t}) + "\n" for t, _, _ in docs))
    spec = ",".join(f"{folder / s}*{w}" for s, w in (("a", 2), ("b", 1.5), ("c", 0.5)))
    return spec, [doc for name in sorted(files) for doc in files[name]]


def _weighted_reference(occurrences):
    """The mixture by hand: validation keeps each distinct document once; a train occurrence
    with no copies by its weight is not in the mixture; one whose original was seen (in
    validation or kept earlier) is removed once, with all its copies; the rest are kept
    copies(hash, weight) times in a row."""
    val, seen_val = [], set()
    for text, _, original in occurrences:
        if is_val(doc_hash(text), 0.1) and original not in seen_val:
            seen_val.add(original)
            val.append(text)
    train, kept, texts = [], set(seen_val), {t for t in val}
    removed, repeats = {"exact": 0, "near": 0}, 0
    for text, weight, original in occurrences:
        n = copies(doc_hash(text), weight)
        if is_val(doc_hash(text), 0.1) or n == 0:
            continue
        if original in kept:
            removed["exact" if text in texts else "near"] += 1
            continue
        kept.add(original)
        texts.add(text)
        train += [text] * n
        repeats += n - 1
    return val, train, removed, repeats


def test_a_weighted_source_keeps_its_repeats_and_real_duplicates_go_with_all_of_theirs(tmp_path):
    """Weight 2 keeps every document twice, 1.5 and 0.5 the hash-chosen share; dedup compares
    distinct source documents, so the repeats survive (counted as repeats) while a real copy
    (a second file, another source, a near copy, a near copy of a validation document) is
    removed once with all its repeats: the manifest and shards equal a reference by hand."""
    spec, occurrences = _weighted_corpus(tmp_path / "c")
    data = StreamData.open(prepare_stream(_cfg(tmp_path, spec), verbose=False), verify=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.path / "tokenizer.json"))
    val, train, removed, repeats = _weighted_reference(occurrences)
    assert [tok.decode(d[:-1]) for d in _all_docs(data, "val")] == val
    assert [tok.decode(d[:-1]) for d in _all_docs(data, "train")] == train
    manifest = data.parts[0]
    assert manifest["removed"]["train"] == removed and removed["exact"] >= 5
    assert removed["near"] == 2  # b's near copy, and a's near copy of a validation document
    assert manifest["repeats"] == repeats == sum(s["repeats"] for s in data.shards("train"))
    only_a = [t for t, w, _ in occurrences if w == 2.0 and t in train]
    assert only_a and all(train.count(t) == 2 for t in only_a)  # not a function of copies()
    assert sum(s["docs"] for s in data.shards("train")) == len(train)
