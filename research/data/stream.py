"""Streaming `research prepare` for many-file corpora: sources -> exact and near-duplicate
removal -> tokenization in worker processes -> fixed-size token shards with a manifest.

Memory stays bounded by the batches in flight, not the corpus: documents are read one file at a
time and at most ``2 x workers`` batches wait in the pool. What grows with the corpus is the
dedup state, kept compact (research/data/dedup.py): 8 bytes per document for exact dedup, and
40 more per kept document for the MinHash-LSH band keys when ``data.near_dedup`` is on (README:
Data at scale has the measured peak memory).

Layout of a prepared folder (``<cache>/prepared/stream-<key>-n<parts>``)::

    tokenizer.json
    val-00000.npy, val-00000.idx.npy, ...              written by part 0 only
    train-p00000-00000.npy, train-p00000-00000.idx.npy, ...
    part-00000-of-00001.json                            the part's manifest, written last

A shard is a ``.npy`` token array (uint16, or uint32 for big vocabularies; memory-mapped by the
loader) holding whole documents, each followed by EOS; its ``.idx.npy`` holds the documents'
start offsets plus the end, and its ``.dedup.npy`` the kept documents' hashes, UTF-8 sizes and
LSH band keys, so a resumed prepare rebuilds the dedup state without reading those documents
again (and the pass across parts, research/data/across_parts.py, without reading any text).
Every file is written to a temporary name and renamed; the part's journal (``.progress-*.json``)
records each finished shard, so an interrupted prepare keeps its shards and restarts after the
last one.

Parts: ``--num-shards N --shard-index I`` gives part I the I-th contiguous slice of the files
(in source order); its output is a function of (files, settings, N, I) alone. Dedup is global
within a part and against all validation documents; duplicates across parts stay until the
global pass (``--dedup-parts``) removes them (the counts in each manifest say what was
removed). The whole dataset is the parts in order.

Weights: dedup sees each source document once (``sources.mixture_distinct``); a kept train
document is then written ``copies`` times in a row in one shard, so a weight's repeats are never
taken for duplicates and a real duplicate goes with all of its repeats.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import numpy as np

from research.config import ConfigError, DataConfig
from research.data.corpus import DataError, cache_root, sha256_file
from research.data.dedup import Dedup, band_shape, banded_keys, minhashes
from research.data.sources import (
    HF_PREFIX,
    Source,
    Stats,
    mixture_distinct,
    mixture_documents,
    parse_sources,
    work_units,
)

FORMAT_VERSION = 4  # 2: .dedup.npy holds band keys; 3: numpy shingles, documents' bytes too;
# 4: a weight's repeats are kept (in a row, in one shard) instead of removed as duplicates
BATCH_DOCS = 256  # documents per task sent to a worker
SIDECAR_KEYS = 24  # .dedup.npy rows: 16-byte hash, UTF-8 bytes (uint64), then the band keys
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")


# ---------- workers ----------

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, near_dedup: tuple[int, int] | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    from tokenizers import Tokenizer

    _WORKER["tok"] = Tokenizer.from_str(tokenizer_json)
    _WORKER["near"] = near_dedup


def _work(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(all token ids, per-document lengths, LSH band keys or None) of a batch: the MinHash
    work happens here, in the workers, not in the parent."""
    encoded = _WORKER["tok"].encode_batch(texts, add_special_tokens=False)
    arrays = [np.array(e.ids, np.uint32) for e in encoded]  # e.ids builds a list: once each
    lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
    ids = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
    near = _WORKER["near"]
    return ids, lengths, None if near is None else banded_keys(minhashes(texts), *near)


# ---------- shards ----------


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _InProcess:
    """One worker: tokenize in this process (no start-up cost; where children are not allowed)."""

    workers = 1

    def __init__(self, tokenizer_json: str, near_dedup: tuple[int, int] | None):
        _init_worker(tokenizer_json, near_dedup)

    def apply_async(self, fn, args):
        return _Done(fn(*args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Processes:
    """Worker processes, started with spawn (no forked copies of a parent's JAX threads)."""

    def __init__(self, workers: int, tokenizer_json: str, near_dedup: tuple[int, int] | None):
        context = multiprocessing.get_context("spawn")
        self.workers = workers
        self.pool = context.Pool(workers, _init_worker, (tokenizer_json, near_dedup))

    def apply_async(self, fn, args):
        return self.pool.apply_async(fn, args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.terminate()
        return False


def _pool(workers: int, tokenizer_json: str, near_dedup: tuple[int, int] | None):
    """``near_dedup``: the LSH (bands, rows) the workers compute band keys for, or None (off)."""
    if workers == 1 or multiprocessing.current_process().daemon:
        return _InProcess(tokenizer_json, near_dedup)
    return _Processes(workers, tokenizer_json, near_dedup)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class ShardWriter:
    """Collects kept documents and writes a shard each time ``shard_tokens`` is reached."""

    def __init__(self, folder: Path, prefix: str, shard_tokens: int, dtype, write: bool):
        self.folder, self.prefix, self.shard_tokens = folder, prefix, shard_tokens
        self.dtype, self.write = dtype, write
        self.shards: list[dict] = []
        self._reset()

    def _reset(self):
        self.ids, self.lengths, self.digests, self.sigs, self.tokens = [], [], [], [], 0
        self.bytes, self.doc_bytes, self.repeats = 0, [], 0

    def add(
        self, ids: np.ndarray, digest: bytes, keys: np.ndarray | None, nbytes: int, copies: int = 1
    ) -> bool:
        """Append one document (``nbytes`` of UTF-8 text) ``copies`` times in a row (a weight's
        repeats, never split across shards, so a resume never loses some of them); True when
        that closed a shard."""
        for _ in range(copies):
            self.bytes += nbytes
            self.doc_bytes.append(nbytes)
            self.ids.append(ids)
            self.lengths.append(len(ids))
            self.digests.append(np.frombuffer(digest, np.uint8))
            self.sigs.append(keys)
            self.tokens += len(ids)
        self.repeats += copies - 1
        if self.tokens >= self.shard_tokens:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.ids:
            return
        name = f"{self.prefix}-{len(self.shards):05d}"
        info = {
            "file": f"{name}.npy",
            "tokens": self.tokens,
            "docs": len(self.ids),
            "bytes": self.bytes,  # of UTF-8 text: bits per byte compares tokenizers
            "repeats": self.repeats,  # documents that repeat the one before (a weight above 1)
        }
        if self.write:
            offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
            _atomic_save(self.folder / f"{name}.idx.npy", offsets)
            nbytes = np.asarray(self.doc_bytes, "<u8").view(np.uint8).reshape(-1, 8)
            dedup = np.concatenate([np.stack(self.digests), nbytes], axis=1)
            if self.sigs[0] is not None:
                dedup = np.concatenate([dedup, np.stack(self.sigs).view(np.uint8)], axis=1)
            _atomic_save(self.folder / f"{name}.dedup.npy", dedup)
            _atomic_save(self.folder / info["file"], np.concatenate(self.ids).astype(self.dtype))
            info["sha256"] = sha256_file(self.folder / info["file"])
            info["idx_sha256"] = sha256_file(self.folder / f"{name}.idx.npy")
        self.shards.append(info)
        self._reset()


def first_copies(rows: np.ndarray) -> np.ndarray:
    """Which rows of a shard's ``.dedup.npy`` are a distinct document, not a weight's repeat
    of the row before: a shard holds all the repeats of its documents in a row, and two
    distinct documents of a part never share a hash (exact dedup)."""
    first = np.ones(len(rows), bool)
    first[1:] = (rows[1:, :16] != rows[:-1, :16]).any(axis=1)
    return first


def _load_dedup(folder: Path, shard: dict, dedup: Dedup) -> None:
    """Rebuild dedup state from a finished shard's sidecar (resume)."""
    rows = np.load(folder / shard["file"].replace(".npy", ".dedup.npy"))
    rows = rows[first_copies(rows)]
    keys = np.ascontiguousarray(rows[:, SIDECAR_KEYS:]).view(np.uint64) if dedup.near else None
    dedup.load(rows[:, :16], keys)


# ---------- settings, fingerprint, tokenizer ----------


def sources_of(cfg: DataConfig) -> list[Source]:
    return [
        Source(
            s.path,
            s.weight,
            text_key=cfg.text_key,
            val_fraction=cfg.val_fraction,
            txt_separator=cfg.doc_separator,
        )
        for s in parse_sources(cfg.sources)
    ]


def fingerprint(units: list[tuple[int, str]], sample_bytes: int = 1 << 16) -> str:
    """A content hash from each file's size, mtime and first ``sample_bytes``: cheap on every
    run (no file is read whole), and it changes when a file is replaced or edited."""
    digest = hashlib.sha256()
    for index, url in units:
        if url.startswith(HF_PREFIX):  # a hub dataset: keyed by its name (and @split) only
            digest.update(f"{index}|{url}|".encode())
            continue
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        mtime = info.get("mtime") or info.get("updated") or info.get("LastModified") or ""
        digest.update(f"{index}|{url}|{info.get('size')}|{mtime}|".encode())
        with fs.open(path, "rb") as handle:
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


def settings_key(cfg: DataConfig, content: str) -> str:
    settings = {
        "content": content,
        "format": FORMAT_VERSION,
        **{k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "workers", "corpus")},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def special_ids(tok, cfg: DataConfig) -> tuple[int | None, int | None]:
    """(BOS, EOS) ids: named in the config, or 'auto' (the usual names), or '' for none."""

    def find(setting: str, names: tuple[str, ...], what: str) -> int | None:
        if not setting:
            return None
        candidates = names if setting == "auto" else (setting,)
        for name in candidates:
            if (found := tok.token_to_id(name)) is not None:
                return found
        if setting == "auto" and what == "bos":
            return None  # many tokenizers (GPT-2's) have no BOS
        raise DataError(
            f"the tokenizer has no {what.upper()} token among {', '.join(candidates)}; set "
            f"data.{what}_token to its name, or to '' for none"
        )

    return find(cfg.bos_token, BOS_NAMES, "bos"), find(cfg.eos_token, EOS_NAMES, "eos")


def _sample_docs(sources, units, cfg: DataConfig) -> Iterator[str]:
    """Train documents from the start of the mixture, up to ``bpe_sample_bytes`` in all."""
    taken = 0
    for doc, _ in mixture_documents(sources, units, "train", Stats(), cfg.skip_bad_files):
        yield doc
        taken += len(doc)
        if taken >= cfg.bpe_sample_bytes:
            return


def stream_tokenizer(cfg: DataConfig, sources, units, out: Path):
    """The tokenizer: loaded from data.tokenizer_file, or BPE trained on a bounded sample of
    the whole mixture (the same sample for every part), saved once as ``tokenizer.json``."""
    from tokenizers import Tokenizer

    from research.data.tokenizer import BPETokenizer

    path = out / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    if cfg.tokenizer_file:
        try:
            with fsspec.open(cfg.tokenizer_file, "r") as handle:
                tok = Tokenizer.from_str(handle.read())
        except Exception as error:  # OSError, or tokenizers' plain Exception for a bad file
            raise DataError(
                f"data.tokenizer_file={cfg.tokenizer_file} cannot be loaded ({error}); give the "
                "path of a Hugging Face tokenizer.json (e.g. GPT-2's or Llama 3's)"
            ) from None
    else:
        tok = BPETokenizer.train(_sample_docs(sources, units, cfg), cfg.bpe_vocab_size)._tok
    tmp = out / f".tmp-tokenizer-{os.getpid()}.json"
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


# ---------- the prepare ----------


@dataclass
class _Progress:
    """A progress bar over the part's input files (by their size on disk, so the ETA holds for
    compressed files too), with documents/s and tokens/s. ``stats.files`` says which file the
    reader is in; validation, read first, shows as the rate with no advance."""

    sizes: list[int]
    stats: Stats
    show: bool
    docs: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        from tqdm.auto import tqdm

        self.done = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.bar = tqdm(
            total=self.done[-1], unit="B", unit_scale=True, disable=not self.show, smoothing=0.1
        )

    def advance(self, docs: int, tokens: int) -> None:
        self.docs, self.tokens = self.docs + docs, self.tokens + tokens
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.done[max(0, self.stats.files - 1)] - self.bar.n)  # files finished
        self.bar.set_postfix_str(
            f"{self.docs / seconds:,.0f} docs/s, {self.tokens / seconds:,.0f} tokens/s", False
        )

    def close(self):
        self.bar.update(self.done[-1] - self.bar.n)
        self.bar.close()


def _run_split(
    split: str,
    docs: Iterator[tuple[str, bytes, int]],
    writer: ShardWriter,
    dedup: Dedup,
    pool,
    specials: tuple[int | None, int | None],
    journal,
    progress: _Progress,
    skip: int = 0,
) -> None:
    """Tokenize the split's distinct documents (text, hash, copies) in the pool (at most 2 x
    workers batches in flight, so memory stays bounded), drop duplicates in stream order, write
    each kept one ``copies`` times. ``skip``: documents already in finished shards (a resume);
    ``journal(split, consumed)`` runs at each shard."""
    bos, eos = specials
    pending: deque = deque()
    window = 2 * pool.workers
    consumed = skip

    def submit(batch):
        dups = dedup.exact_dups([digest for _, digest, _ in batch])
        batch = [(None if dup else text, digest, n)
                 for (text, digest, n), dup in zip(batch, dups, strict=True)]  # fmt: skip
        texts = [text for text, _, _ in batch if text is not None]
        pending.append((batch, pool.apply_async(_work, (texts,))))

    def drain_one():
        nonlocal consumed
        batch, result = pending.popleft()
        ids, lengths, keys = result.get()
        near = dedup.near_dups(keys)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        j = 0  # index among the batch's tokenized documents
        for text, digest, copies in batch:
            consumed += 1
            nbytes = len(text.encode("utf-8")) if text is not None else 0
            if text is None:  # an exact duplicate, dropped before tokenizing
                continue
            row = None if keys is None else keys[j]
            doc, j = ids[starts[j] : starts[j + 1]], j + 1
            if keys is not None and near[j - 1]:
                continue
            pieces = [[bos]] * (bos is not None) + [doc] + [[eos]] * (eos is not None)
            doc = np.concatenate(pieces) if len(pieces) > 1 else doc
            if writer.add(doc, digest, row, nbytes, copies):
                journal(split, consumed)
        progress.advance(len(batch), int(lengths.sum()))

    batch = []
    for index, item in enumerate(docs):
        if index < skip:
            continue
        batch.append(item)  # exact duplicates are marked as the batch is sent
        if len(batch) == BATCH_DOCS:
            submit(batch)
            batch = []
            while len(pending) > window:
                drain_one()
    if batch:
        submit(batch)
    while pending:
        drain_one()
    writer.flush()
    journal(split, consumed)


def _dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _size(url: str) -> int:
    if url.startswith(HF_PREFIX):
        return 0  # unknown until streamed
    fs, path = fsspec.core.url_to_fs(url)
    return fs.size(path)


def part_name(part: int, num_parts: int) -> str:
    return f"part-{part:05d}-of-{num_parts:05d}"


def prepared_folder(
    cfg: DataConfig, num_parts: int = 1
) -> tuple[Path, list[Source], list[tuple[int, str]]]:
    """Where a streaming prepare of ``cfg`` in ``num_parts`` parts goes (by settings and content
    hash), its sources and work units."""
    sources = sources_of(cfg)
    problems = [p for s in sources for p in s.problems()]
    if problems or not sources:
        raise ConfigError("; ".join(problems) or "data.sources is empty: name a file or folder")
    units = work_units(sources)
    key = settings_key(cfg, fingerprint(units))
    return cache_root(cfg.cache_dir) / "prepared" / f"stream-{key}-n{num_parts}", sources, units


def prepare_stream(
    cfg: DataConfig, part: int = 0, num_parts: int = 1, verbose: bool = True
) -> Path:
    """Prepare part ``part`` of ``num_parts`` (or return at once if its manifest exists).

    Returns the prepared folder; the dataset is complete when every part's manifest is there."""
    if not 0 <= part < num_parts:
        raise ConfigError(f"--shard-index {part} must be in [0, --num-shards={num_parts})")
    out, sources, units = prepared_folder(cfg, num_parts)
    name = part_name(part, num_parts)
    if (out / f"{name}.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = stream_tokenizer(cfg, sources, units, out)
    specials = special_ids(tok, cfg)
    dtype = _dtype(tok.get_vocab_size())
    lo, hi = part * len(units) // num_parts, (part + 1) * len(units) // num_parts
    mine = units[lo:hi]
    journal_path = out / f".progress-{name}.json"
    journal = json.loads(journal_path.read_text()) if journal_path.exists() else {}
    dedup = Dedup(cfg.near_dedup, cfg.near_dedup_threshold)
    stats = Stats()
    writers = {
        "val": ShardWriter(out, "val", cfg.shard_tokens, dtype, write=part == 0),
        "train": ShardWriter(out, f"train-p{part:05d}", cfg.shard_tokens, dtype, write=True),
    }
    state = {"val_counts": None, "train": journal.get("train", {"shards": [], "consumed": 0})}

    def record(split: str, consumed: int) -> None:
        if split == "train":  # val is redone on a resume: it is small
            shards = writers["train"].shards
            counts = dict(dedup.counts)
            state["train"] = {"shards": list(shards), "consumed": consumed, "counts": counts}
            _atomic_json(journal_path, {"train": state["train"]})

    progress = _Progress([_size(url) for _, url in mine], stats, verbose)
    workers = cfg.workers or os.cpu_count() or 1
    near = band_shape(cfg.near_dedup_threshold) if cfg.near_dedup else None
    with _pool(workers, tok.to_str(), near) as pool:
        val_docs = mixture_distinct(sources, units, "val", Stats(), cfg.skip_bad_files)
        _run_split("val", val_docs, writers["val"], dedup, pool, specials, record, progress)
        val_counts = dict(dedup.counts)
        resumed = state["train"]
        for shard in resumed["shards"]:
            _load_dedup(out, shard, dedup)
        writers["train"].shards = list(resumed["shards"])
        if resumed.get("counts"):
            dedup.counts = dict(resumed["counts"])
        elif resumed["shards"]:
            raise DataError(f"{journal_path} has shards but no counts; delete it to start over")
        if resumed["shards"] and verbose:
            print(f"prepare: resuming {name} after {len(resumed['shards'])} finished shards")
        train_docs = mixture_distinct(sources, mine, "train", stats, cfg.skip_bad_files)
        _run_split(
            "train",
            train_docs,
            writers["train"],
            dedup,
            pool,
            specials,
            record,
            progress,
            skip=resumed["consumed"],
        )
    progress.close()
    train_counts = {k: dedup.counts[k] - val_counts[k] for k in dedup.counts}
    manifest = {
        "format": FORMAT_VERSION,
        "part": part,
        "num_parts": num_parts,
        "sources": [asdict(s) for s in sources],
        "files": [u for _, u in mine],
        "vocab_size": tok.get_vocab_size(),
        "dtype": dtype,
        "bos_id": specials[0],
        "eos_id": specials[1],
        "read": asdict(stats),
        "removed": {"val": val_counts, "train": train_counts},  # distinct documents
        "repeats": sum(s["repeats"] for s in writers["train"].shards),  # kept, not removed
        "splits": {
            "val": writers["val"].shards if part == 0 else [],
            "train": writers["train"].shards,
        },
        "seconds": round(time.perf_counter() - progress.start, 3),
    }
    _atomic_json(out / f"{name}.json", manifest)
    journal_path.unlink(missing_ok=True)
    if verbose:
        tokens = sum(s["tokens"] for s in manifest["splits"]["train"])
        print(
            f"prepare: {name}: {stats.documents:,} documents read, {tokens:,} train tokens in "
            f"{len(manifest['splits']['train'])} shards ({manifest['repeats']:,} repeats of "
            f"weighted documents); removed {train_counts} -> {out}"
        )
    return out


@dataclass
class StreamData:
    """A complete streaming prepare: every part's manifest, read in part order."""

    path: Path
    parts: list[dict]

    @classmethod
    def open(cls, path: Path, verify: bool = False) -> StreamData:
        path = Path(path)
        found = sorted(path.glob("part-*-of-*.json"))
        if not found:
            raise DataError(f"{path} holds no part manifest: run `research prepare` first")
        num_parts = json.loads(found[0].read_text())["num_parts"]
        missing = [part_name(i, num_parts) for i in range(num_parts)]
        missing = [n for n in missing if not (path / f"{n}.json").exists()]
        if missing:
            raise DataError(
                f"{path} is incomplete: {len(missing)} of {num_parts} parts missing "
                f"({', '.join(missing[:3])}...); run `research prepare --num-shards {num_parts} "
                "--shard-index I` for each of them"
            )
        parts = [json.loads((path / f"{part_name(i, num_parts)}.json").read_text())
                 for i in range(num_parts)]  # fmt: skip
        data = cls(path, parts)
        if verify:
            data.verify()
        return data

    def shards(self, split: str) -> list[dict]:
        return [s for part in self.parts for s in part["splits"][split]]

    def verify(self) -> None:
        """Every shard and index against its manifest checksum; names the first bad file."""
        for split in ("val", "train"):
            for shard in self.shards(split):
                for key, name in (("sha256", shard["file"]), ("idx_sha256", _idx(shard["file"]))):
                    if sha256_file(self.path / name) != shard[key]:
                        raise DataError(
                            f"{self.path / name} does not match its manifest checksum: the file "
                            "is damaged; delete the prepared folder and prepare again"
                        )

    def tokens(self, shard: dict) -> np.ndarray:
        return np.load(self.path / shard["file"], mmap_mode="r")

    def offsets(self, shard: dict) -> np.ndarray:
        return np.load(self.path / _idx(shard["file"]))

    @property
    def vocab_size(self) -> int:
        return self.parts[0]["vocab_size"]


def _idx(file: str) -> str:
    return file.replace(".npy", ".idx.npy")


class StreamPrepared:
    """A complete streaming prepare behind the interface training and eval use (the legacy
    ``PreparedData``'s): vocabulary, tokenizer, a split's tokens, bytes per token."""

    def __init__(self, data: StreamData):
        self.stream, self.path = data, data.path

    @property
    def vocab_size(self) -> int:
        return self.stream.vocab_size

    def tokenizer(self):
        from research.data.tokenizer import load_tokenizer

        return load_tokenizer(self.path / "tokenizer.json")

    def tokens(self, split: str) -> np.ndarray:
        """The split's documents end to end, read into memory (small splits, tools). Training
        and evaluation read packed documents lazily through ``research.data.packing``."""
        return np.concatenate([self.stream.tokens(s) for s in self.stream.shards(split)])

    def bytes_per_token(self, split: str) -> float:
        shards = self.stream.shards(split)
        return sum(s["bytes"] for s in shards) / sum(s["tokens"] for s in shards)


def prepared_stream(cfg: DataConfig, verbose: bool = True, may_prepare: bool = True):
    """The complete prepare of ``cfg`` (in any number of parts), preparing it in one part first
    when there is none and ``may_prepare`` (a single-process run; several processes would race:
    run `research prepare` before a multi-host run)."""
    out, _, _ = prepared_folder(cfg, 1)
    for folder in sorted(out.parent.glob(out.name[: -len("-n1")] + "-n*")):
        try:
            return StreamPrepared(StreamData.open(folder))
        except DataError:
            continue  # an incomplete set of parts
    if not may_prepare:
        raise DataError(
            f"no complete prepare of data.sources={cfg.sources} in {out.parent}; run `research "
            "prepare` (with --num-shards N --shard-index I for each part) before this "
            "multi-process run"
        )
    return StreamPrepared(StreamData.open(prepare_stream(cfg, verbose=verbose)))
