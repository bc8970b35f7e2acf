"""Documents from many files: folders or globs of .txt, .jsonl(.gz/.zst), .parquet and Hugging
Face ``datasets``, on local disk or any fsspec filesystem (``gs://``, ``s3://``, ``memory://``).

A ``Source`` names where its documents are, the text field, its weight in the mixture and its
own held-out fraction. Which split a document belongs to, and how many copies of it the mixture
keeps, are functions of the document's text alone (a hash), so they do not depend on file order,
worker count or machine, and two copies of one text always land in the same split.

Bad input: a file that is not UTF-8, a JSON line that does not parse, a line without the text
field, or a compressed / Parquet file that cannot be read raises ``DataError`` naming the file
(and the line or byte offset): silently losing part of a corpus is worse than stopping. With
``skip_bad_files=True`` such a file is skipped instead and counted (``Stats.bad_files``), for
web-scale corpora where one bad file of thousands should not stop a day's job. Empty files and
blank documents are always skipped and counted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from research.data.corpus import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".parquet")
HF_PREFIX = "hf:"  # hf:NAME[/CONFIG][@SPLIT]: a Hugging Face dataset, streamed


@dataclass(frozen=True)
class Source:
    """Where one part of a mixture comes from.

    ``path``: a file, folder (searched recursively), glob or URL, or ``hf:NAME[/CONFIG][@SPLIT]``.
    ``weight``: copies per train document: 2.0 keeps every document twice, 0.5 a hash-chosen
    half (the copies are repeats, not duplicates: dedup sees the document once).
    ``val_fraction``: the share of this source's documents held out for validation.
    ``txt_separator``: a .txt file is one document, or several split on this separator."""

    path: str
    weight: float = 1.0
    text_key: str = "text"
    val_fraction: float = 0.01
    txt_separator: str = ""

    def problems(self) -> list[str]:
        found = []
        if not self.path.strip():
            found.append("a source's path is empty: give a file, folder, glob or URL")
        if not self.weight > 0:
            found.append(f"source {self.path}: weight={self.weight!r} must be > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            found.append(
                f"source {self.path}: val_fraction={self.val_fraction!r} must be in [0, 1)"
            )
        return found


@dataclass
class Stats:
    """What reading the sources found, for the manifest."""

    files: int = 0
    empty_files: int = 0
    bad_files: list[str] = field(default_factory=list)
    documents: int = 0
    blank_documents: int = 0


def parse_sources(spec: str) -> list[Source]:
    """``PATH[*WEIGHT][,PATH[*WEIGHT]...]`` (the ``data.sources`` setting) as Sources; a
    trailing ``*NUMBER`` is a weight, any other ``*`` is part of a glob."""
    sources = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, star, weight = part.rpartition("*")
        try:
            sources.append(Source(path.strip(), float(weight)) if star else Source(part))
        except ValueError:  # a glob's own '*': no weight given
            sources.append(Source(part))
    return sources


def doc_hash(text: str) -> bytes:
    """The 16-byte identity of a document (its stripped text), used for dedup and the split."""
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()


def _unit(digest: bytes, salt: int) -> float:
    """A uniform number in [0, 1) drawn from a document's hash (different salts: independent)."""
    return int.from_bytes(digest[salt * 4 : salt * 4 + 4], "little") / 2**32


def is_val(digest: bytes, val_fraction: float) -> bool:
    return _unit(digest, 0) < val_fraction


def copies(digest: bytes, weight: float) -> int:
    """How many times the mixture keeps a document: floor(weight), plus one with the rest's
    probability (so the expected count is the weight)."""
    whole = int(weight)
    return whole + (_unit(digest, 1) < weight - whole)


def expand(source: Source) -> list[str]:
    """The files of a source, sorted, as URLs fsspec opens (local paths stay paths)."""
    if source.path.startswith(HF_PREFIX):
        return [source.path]
    fs, root = fsspec.core.url_to_fs(source.path)
    if any(ch in root for ch in "*?["):
        found = fs.glob(root)
    elif fs.isdir(root):
        found = [p for p in fs.find(root) if p.endswith(SUFFIXES)]
    elif fs.exists(root):
        found = [root]
    else:
        raise DataError(
            f"source {source.path} does not exist. Fix the path, or check the credentials of "
            "its object store (gs:// needs gcsfs, s3:// needs s3fs)."
        )
    files = sorted(p for p in found if not fs.isdir(p))
    if not files:
        raise DataError(
            f"source {source.path} holds no files ending in {', '.join(SUFFIXES)}; point it at "
            "the corpus' files or a glob that matches them."
        )
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return files if protocol in ("file", "local") else [fs.unstrip_protocol(p) for p in files]


def _decode(raw: bytes, url: str, where: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{url}{where} is not UTF-8 text: byte offset {error.start} "
            f"(bytes {raw[error.start : error.start + 4].hex(' ')}) {error.reason}. Convert it "
            "(e.g. iconv -f latin1 -t utf-8), remove it, or set data.skip_bad_files=true."
        ) from None


def _need(module: str, package: str):
    """Import an optional reader, or say which package to install (the `data` extra has all
    but Hugging Face `datasets`, which has its own: `datasets`)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"reading this corpus needs {package}: pip install {package} (or "
            f"'.[{'datasets' if package == 'datasets' else 'data'}]')"
        ) from None


def _open_lines(url: str):
    """A binary line reader of a file, decompressed by its suffix."""
    handle = fsspec.open(url, "rb").open()
    if url.endswith(".gz"):
        return gzip.GzipFile(fileobj=handle)
    if url.endswith(".zst"):
        zstandard = _need("zstandard", "zstandard")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(handle))
    return handle


def _jsonl(url: str, key: str) -> Iterator[str]:
    with _open_lines(url) as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                _decode(raw, url, f" line {number}")
                raise
            except ValueError as error:
                raise DataError(
                    f"{url} line {number} is not JSON ({error}); fix or remove the line, or set "
                    "data.skip_bad_files=true."
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise DataError(
                    f"{url} line {number} has no text field {key!r} (keys: "
                    f"{', '.join(record) if isinstance(record, dict) else type(record).__name__}); "
                    "set the source's text_key to the field that holds the text."
                )
            yield record[key]


def _parquet(url: str, key: str) -> Iterator[str]:
    pq = _need("pyarrow.parquet", "pyarrow")
    with fsspec.open(url, "rb") as handle:
        reader = pq.ParquetFile(handle)
        if key not in reader.schema_arrow.names:
            raise DataError(
                f"{url} has no column {key!r} (columns: {', '.join(reader.schema_arrow.names)}); "
                "set the source's text_key to the column that holds the text."
            )
        for batch in reader.iter_batches(batch_size=1024, columns=[key]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _txt(url: str, separator: str) -> Iterator[str]:
    with fsspec.open(url, "rb") as handle:
        text = _decode(handle.read(), url)
    yield from (text.split(separator) if separator else [text])


def _hf(spec: str, key: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"source {spec} needs the Hugging Face `datasets` package: pip install datasets"
        ) from None
    name, _, split = spec[len(HF_PREFIX) :].partition("@")
    if name.endswith(SUFFIXES) or "*" in name:  # files (any path) through datasets' json/parquet
        builder = "parquet" if name.endswith(".parquet") else "json"
        ds = datasets.load_dataset(builder, data_files=name, split=split or "train", streaming=True)
    else:  # a hub dataset: OWNER/NAME[/CONFIG]
        name, config = name.rsplit("/", 1) if name.count("/") > 1 else (name, None)
        ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
    for record in ds:
        yield record[key]


def file_documents(url: str, source: Source) -> Iterator[str]:
    """The documents of one file (or Hugging Face dataset) of a source, in file order."""
    if url.startswith(HF_PREFIX):
        yield from _hf(url, source.text_key)
    elif url.endswith(".parquet"):
        yield from _parquet(url, source.text_key)
    elif url.endswith(".txt"):
        yield from _txt(url, source.txt_separator)
    elif ".json" in url.rsplit("/", 1)[-1]:
        yield from _jsonl(url, source.text_key)
    else:
        raise DataError(f"{url}: unknown file type; use one of {', '.join(SUFFIXES)}")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt gzip, zstd or Parquet file raises (besides our own DataError)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, ValueError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def read_file(url: str, source: Source, stats: Stats, skip_bad: bool) -> Iterator[str]:
    """A file's non-blank documents, counting files, blanks and (when skipping) bad files.

    Streams: a file is never held in memory whole. A skipped bad file keeps the documents read
    before the error (the same ones on every run, so the output stays a function of the input)."""
    stats.files += 1
    empty = True
    try:
        for doc in file_documents(url, source):
            empty = False
            if not doc.strip():
                stats.blank_documents += 1
                continue
            stats.documents += 1
            yield doc
    except DataError as error:
        if not skip_bad:
            raise
        stats.bad_files.append(str(error))
        return
    except _read_errors() as error:
        if not skip_bad:
            raise DataError(
                f"{url} cannot be read ({type(error).__name__}: {error}); it is corrupt or not "
                "the format its name says. Replace or remove it, or set data.skip_bad_files=true."
            ) from None
        stats.bad_files.append(f"{url}: {type(error).__name__}: {error}")
        return
    stats.empty_files += empty


def work_units(sources: list[Source]) -> list[tuple[int, str]]:
    """Every (source index, file) of a mixture, in a fixed order: the units a prepare splits
    into parts (``--num-shards``)."""
    return [(i, url) for i, source in enumerate(sources) for url in expand(source)]


def mixture_distinct(
    sources: list[Source],
    units: list[tuple[int, str]],
    split: str,
    stats: Stats,
    skip_bad: bool = False,
) -> Iterator[tuple[str, bytes, int]]:
    """(text, hash, copies) of each of the split's source documents in the given units, once:
    what dedup compares (a weight's deliberate repeats are not duplicates). Validation keeps
    each of its documents once; train has ``copies(hash, weight)`` of each, and a document
    with none (a fractional weight's unchosen share) is not in the mixture at all."""
    for index, url in units:
        source = sources[index]
        for doc in read_file(url, source, stats, skip_bad):
            digest = doc_hash(doc)
            if is_val(digest, source.val_fraction) != (split == "val"):
                continue
            n = 1 if split == "val" else copies(digest, source.weight)
            if n:
                yield doc, digest, n


def mixture_documents(
    sources: list[Source],
    units: list[tuple[int, str]],
    split: str,
    stats: Stats,
    skip_bad: bool = False,
) -> Iterator[tuple[str, bytes]]:
    """(text, hash) of the split's documents in the given units, each repeat in a row (the
    mixture as a model sees it, e.g. for the BPE sample). Validation keeps each of its
    documents once; train repeats or subsamples each by its source's weight."""
    for doc, digest, n in mixture_distinct(sources, units, split, stats, skip_bad):
        for _ in range(n):
            yield doc, digest
