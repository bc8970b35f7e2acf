"""The pass across parts (research/data/across_parts.py) against the single-process prepare."""

import json

import numpy as np
import pytest

import research.data.across_parts as across_parts
from research.config import DataConfig
from research.data.across_parts import dedup_across_parts
from research.data.sources import doc_hash, is_val
from research.data.stream import StreamData, prepare_stream

WORDS = "the of and to in a is that for it as was with be by on not he this are or his".split()


def _train(text):
    return not is_val(doc_hash(text), 0.1)


def _corpus(folder, weighted=False):
    """Four files (two parts of two): the last file repeats three train documents of the first
    part exactly and holds near copies (one word of 400 changed, Jaccard ~0.97) of four more
    (all in train, so none is removed as a copy of a validation document instead).
    ``weighted``: the first two files in folder a, the last two in b, for sources a*1.5,b*2."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    texts = [[" ".join(rng.choice(WORDS, rng.integers(20, 60))) + f" doc{f}x{d}" for d in range(40)]
             for f in range(4)]  # fmt: skip
    long_docs, near = [], []
    while len(near) < 4:
        text = " ".join(rng.choice(WORDS, 400)) + f" long{len(near)}"
        words = text.split()
        words[int(rng.integers(len(words)))] = "CHANGED"
        if _train(text) and _train(" ".join(words)):
            long_docs.append(text)
            near.append(" ".join(words))
    texts[1] += long_docs
    exact = [t for t in texts[0] if _train(t)][:3]
    texts[3] = texts[3][:20] + exact + near + texts[3][20:]
    for f, docs in enumerate(texts):
        path = folder / "ab"[f // 2] / f"f{f}.jsonl" if weighted else folder / f"f{f}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with open(path, "w") as handle:
            handle.writelines(json.dumps({"text": t}) + "\n" for t in docs)


def _cfg(tmp_path, cache, sources=None):
    return DataConfig(sources=sources or str(tmp_path / "c"), tokenizer="bpe", bpe_vocab_size=300,
                      shard_tokens=1500, cache_dir=str(tmp_path / cache), workers=1,
                      val_fraction=0.1)  # fmt: skip


def _docs(data, split="train"):
    docs = []
    for shard in data.shards(split):
        tokens, offsets = data.tokens(shard), data.offsets(shard)
        docs += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return docs


def _totals(data):
    shards = data.shards("train")
    removed = [sum(p["removed"]["train"][k] for p in data.parts) for k in ("exact", "near")]
    return [sum(s[k] for s in shards) for k in ("tokens", "docs", "bytes")] + removed


def _two_parts(tmp_path, cache="parts", sources=None):
    cfg = _cfg(tmp_path, cache, sources)
    for part in (0, 1):
        folder = prepare_stream(cfg, part, 2, verbose=False)
    return cfg, folder


def _files(folder):
    """Every file's bytes; the manifests' contents without their timing."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for name in [n for n in files if n.startswith("part-")]:
        files[name] = {k: v for k, v in json.loads(files[name]).items() if k != "seconds"}
    return files


def test_the_pass_gives_the_single_process_prepare(tmp_path):
    """Copies in part 1 of part 0's documents survive the parts and not the pass; after it the
    train documents, their tokens, bytes and removed counts are the single-process prepare's,
    only the shards that lost documents were rewritten, and a second run changes nothing."""
    _corpus(tmp_path / "c")
    one = StreamData.open(prepare_stream(_cfg(tmp_path, "one"), verbose=False))
    assert one.parts[0]["removed"]["train"] == {"exact": 3, "near": 4}
    cfg, folder = _two_parts(tmp_path)
    before = StreamData.open(folder)
    assert len(_docs(before)) == len(_docs(one)) + 7  # the parts kept the copies
    unchanged = [s["file"] for s in before.parts[0]["splits"]["train"]]
    mtimes = {name: (folder / name).stat().st_mtime_ns for name in unchanged}
    assert dedup_across_parts(cfg, 2, verbose=False) == {"exact": 3, "near": 4}
    after = StreamData.open(folder, verify=True)
    assert _docs(after) == _docs(one) and _docs(after, "val") == _docs(one, "val")
    assert _totals(after) == _totals(one)
    assert after.parts[1]["removed"]["across_parts"] == {"exact": 3, "near": 4}
    assert all((folder / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # part 0 kept
    rewritten = [s["file"] for s in after.parts[1]["splits"]["train"] if "-d1" in s["file"]]
    assert 0 < len(rewritten) < len(after.parts[1]["splits"]["train"])
    named = {f.replace(".npy", x) for s in after.shards("train") for f in [s["file"]]
             for x in (".npy", ".idx.npy", ".dedup.npy")}  # fmt: skip
    assert {p.name for p in folder.glob("train-*")} == named  # the replaced files are gone
    files = _files(folder)
    assert dedup_across_parts(cfg, 2, verbose=False) == {"exact": 0, "near": 0}
    assert _files(folder) == files
    assert json.loads((folder / "dedup-parts.json").read_text())["removed"] == {
        "exact": 3,
        "near": 4,
    }


def test_a_weights_repeats_count_once_and_go_with_their_document(tmp_path):
    """Sources a*1.5 (part 0) and b*2 (part 1, holding copies of a's documents): the parts keep
    every repeat; the pass removes a copy with all its repeats and counts it once, giving the
    single-process prepare's documents, counts and repeats."""
    _corpus(tmp_path / "c", weighted=True)
    sources = f"{tmp_path / 'c' / 'a'}*1.5,{tmp_path / 'c' / 'b'}*2"
    one = StreamData.open(prepare_stream(_cfg(tmp_path, "one", sources), verbose=False))
    assert one.parts[0]["removed"]["train"] == {"exact": 3, "near": 4}
    cfg, folder = _two_parts(tmp_path, sources=sources)
    before = StreamData.open(folder)
    assert len(_docs(before)) == len(_docs(one)) + 2 * 7  # the copies, twice each
    assert dedup_across_parts(cfg, 2, verbose=False) == {"exact": 3, "near": 4}
    after = StreamData.open(folder, verify=True)
    assert _docs(after) == _docs(one) and _docs(after, "val") == _docs(one, "val")
    assert _totals(after) == _totals(one)
    repeats = [sum(s["repeats"] for s in d.shards("train")) for d in (before, after, one)]
    assert repeats[0] == repeats[1] + 7 and repeats[1] == repeats[2] > 40
    assert sum(p["repeats"] for p in after.parts) == one.parts[0]["repeats"] == repeats[2]


@pytest.mark.parametrize("dies_in", ["_atomic_json", "_remove_unlisted"])
def test_an_interrupted_pass_finishes_when_run_again(tmp_path, monkeypatch, dies_in):
    """Killed after the new shards are written but before the manifest names them, or after
    the manifest but before the old files are deleted: running again gives the same folder
    as an uninterrupted pass, with no file left over."""
    _corpus(tmp_path / "c")
    cfg, whole = _two_parts(tmp_path, "whole")
    dedup_across_parts(cfg, 2, verbose=False)
    cfg, folder = _two_parts(tmp_path, "killed")
    real = getattr(across_parts, dies_in)

    def dies(*args):
        if dies_in == "_atomic_json" or args[1]["part"] == 1:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(across_parts, dies_in, dies)
    with pytest.raises(KeyboardInterrupt):
        dedup_across_parts(cfg, 2, verbose=False)
    monkeypatch.setattr(across_parts, dies_in, real)
    assert not (folder / "dedup-parts.json").exists()
    StreamData.open(folder, verify=True)  # still a consistent dataset in between
    dedup_across_parts(cfg, 2, verbose=False)
    assert _files(folder) == _files(whole)


def test_research_prepare_dedup_parts_needs_every_part(tmp_path, capsys):
    from research.cli import main

    _corpus(tmp_path / "c")
    common = ["--set", f"data.sources={tmp_path / 'c'}", "--set", "data.workers=1",
              "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.tokenizer=bpe",
              "--set", "data.bpe_vocab_size=300", "--num-shards", "2"]  # fmt: skip
    assert main(["prepare", "tiny", *common, "--shard-index", "1"]) in (0, None)
    assert main(["prepare", "tiny", *common, "--dedup-parts"]) == 2
    assert "1 of 2 parts missing (part-00000-of-00002" in capsys.readouterr().err
    assert main(["prepare", "tiny", *common, "--shard-index", "0"]) in (0, None)
    assert main(["prepare", "tiny", *common, "--dedup-parts"]) in (0, None)
    assert "removed {'exact': 3, 'near': 4} across parts" in capsys.readouterr().out
