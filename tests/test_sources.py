"""Sources: every file format (made here), fsspec URLs, the mixture and the hash split."""

import gzip
import json

import fsspec
import pytest

from research.data.corpus import DataError
from research.data.sources import (
    Source,
    Stats,
    doc_hash,
    expand,
    file_documents,
    is_val,
    mixture_distinct,
    mixture_documents,
    parse_sources,
    read_file,
    work_units,
)

DOCS = [f"document number {i} é ✓" for i in range(50)]


def _write_all_formats(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:10]))
    (folder / "a.jsonl").write_text(lines)
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines.replace("number", "gz").encode()))
    zst = zstandard.ZstdCompressor().compress(lines.replace("number", "zst").encode())
    (folder / "c.jsonl.zst").write_bytes(zst)
    pq.write_table(pa.table({"text": DOCS[10:20], "n": list(range(10))}), folder / "d.parquet")
    (folder / "sub").mkdir()
    (folder / "sub" / "e.txt").write_text("\n\n".join(DOCS[20:23]))
    (folder / "ignored.csv").write_text("x")


def test_every_format_reads_its_documents(tmp_path):
    _write_all_formats(tmp_path)
    src = Source(str(tmp_path), txt_separator="\n\n")
    files = expand(src)
    assert [f.rsplit("/", 1)[-1] for f in files] == [
        "a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt"
    ]  # fmt: skip
    got = {f.rsplit("/", 1)[-1]: list(file_documents(f, src)) for f in files}
    assert got["a.jsonl"] == DOCS[:10]
    assert got["b.jsonl.gz"] == [d.replace("number", "gz") for d in DOCS[:10]]
    assert got["c.jsonl.zst"] == [d.replace("number", "zst") for d in DOCS[:10]]
    assert got["d.parquet"] == DOCS[10:20]
    assert got["e.txt"] == DOCS[20:23]
    assert expand(Source(str(tmp_path / "*.parquet"))) == [str(tmp_path / "d.parquet")]


def test_memory_filesystem_urls_are_read_through_fsspec():
    fs = fsspec.filesystem("memory")
    fs.pipe("/h12corpus/x.jsonl", b'{"text": "in memory"}\n{"text": "two"}\n')
    fs.pipe("/h12corpus/y.txt", b"plain text")
    files = expand(Source("memory://h12corpus"))
    assert files == ["memory:///h12corpus/x.jsonl", "memory:///h12corpus/y.txt"]
    assert [d for f in files for d in file_documents(f, Source("memory://h12corpus"))] == [
        "in memory", "two", "plain text"
    ]  # fmt: skip


def test_bad_files_are_named_or_skipped_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "badline.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    src = Source(str(tmp_path))
    messages = {
        "latin1.txt": "not UTF-8 text: byte offset 3",
        "broken.jsonl.gz": "cannot be read",
        "badline.jsonl": "line 2 is not JSON",
        "nokey.jsonl": "no text field 'text'",
    }
    for name, message in messages.items():
        with pytest.raises(DataError, match=message) as caught:
            list(read_file(str(tmp_path / name), src, Stats(), skip_bad=False))
        assert name in str(caught.value)
    stats = Stats()
    docs = [d for f in expand(src) for d in read_file(f, src, stats, skip_bad=True)]
    assert docs == ["fine"]  # badline.jsonl's first line, read before its bad line
    assert stats.files == 5 and stats.empty_files == 1 and len(stats.bad_files) == 4


def test_mixture_split_is_by_hash_and_weights_repeat_or_subsample(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d + "!"}) + "\n" for d in DOCS))
    sources = [
        Source(str(tmp_path / "a.jsonl"), weight=2.0, val_fraction=0.2),
        Source(str(tmp_path / "b.jsonl"), weight=0.5, val_fraction=0.0),
    ]
    units = work_units(sources)
    val = [d for d, _ in mixture_documents(sources, units, "val", Stats())]
    train = [d for d, _ in mixture_documents(sources, units, "train", Stats())]
    a_val = [d for d in DOCS if is_val(doc_hash(d), 0.2)]
    assert val == a_val and 0 < len(a_val) < 25  # ~20% of source a, none of b
    assert not set(val) & set(train)  # validation documents never reach train
    a_train = [d for d in train if not d.endswith("!")]
    assert a_train == [d for d in DOCS if d not in a_val for _ in range(2)]
    b_train = [d for d in train if d.endswith("!")]
    assert 10 < len(b_train) < 40 and len(set(b_train)) == len(b_train)
    distinct = list(mixture_distinct(sources, units, "train", Stats()))  # what dedup sees
    assert [d for d, _, n in distinct for _ in range(n)] == train
    assert len({d for d, _, _ in distinct}) == len(distinct)  # each source document once
    assert {n for d, _, n in distinct if not d.endswith("!")} == {2}


def test_parse_sources():
    assert parse_sources("a/*.jsonl*2, gs://b/c") == [Source("a/*.jsonl", 2.0), Source("gs://b/c")]
    assert parse_sources("data/*.parquet") == [Source("data/*.parquet")]


def test_a_hugging_face_source_without_datasets_says_what_to_install():
    pytest.importorskip("pyarrow")
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed: the hub path would be taken")
    except ImportError:
        pass
    src = Source("hf:HuggingFaceFW/fineweb/sample-10BT@train")
    assert expand(src) == [src.path]
    with pytest.raises(DataError, match="pip install datasets"):
        list(file_documents(src.path, src))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_hugging_face_datasets_source_of_local_files_streams_what_our_readers_read(
    tmp_path, monkeypatch, kind
):
    """``hf:FILES`` goes through ``datasets.load_dataset(json|parquet, data_files=...,
    streaming=True)``; the reference is the same files through our own readers."""
    pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local files: never the network
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "deep" / "folder"  # several slashes: not mistaken for OWNER/NAME/CONFIG
    folder.mkdir(parents=True)
    for i, part in enumerate((DOCS[:20], DOCS[20:])):
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": part}), folder / f"p{i}.parquet")
        else:
            (folder / f"p{i}.jsonl").write_text(
                "".join(json.dumps({"text": d}) + "\n" for d in part)
            )
    ours = Source(str(folder / f"*.{kind}"))
    expected = [d for url in expand(ours) for d in file_documents(url, ours)]
    hub = Source(f"hf:{folder}/*.{kind}@train")
    assert expand(hub) == [hub.path]
    assert list(file_documents(hub.path, hub)) == expected == DOCS
