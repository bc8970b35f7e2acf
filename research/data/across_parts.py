"""Duplicates across the parts of a streamed prepare, removed in one pass after every part.

``research prepare --num-shards N --shard-index I`` dedups each part on its own (and against
all validation documents), so a document and its copy or near copy in two different parts both
survive. This pass reads only the parts' ``.dedup.npy`` sidecars (each kept document's hash and
LSH band keys, 48 bytes), in part order, and drops a train document whose exact key or any band
key meets a document kept by an EARLIER part: the first by (part, position) is kept, as the
single-process prepare keeps the first in stream order. (It cannot bring back a document its
part dropped for a near copy that this pass then drops: one process would keep that one.) The
index is the prepare's own ``KeySet``, so memory is that of a one-part prepare's dedup state.

Applying it rewrites only the shards that lose documents, each under a new name (``...-dG``,
generation G), then the part's manifest (atomically: counts, checksums, ``removed`` with the
new ``across_parts`` counts), then deletes the replaced files. An interrupted pass therefore
leaves every part either as it was or fully updated, and running it again finishes the job:
parts already updated find nothing more to drop, and files no manifest names are removed.
``dedup-parts.json`` marks a finished pass.

A weight's repeats (the rows after a document with the same hash: written in a row, in one
shard) share their document's keys, so they go with it, and the counts are of distinct
documents, as in the prepare's own; each shard's ``repeats`` and the part's total follow.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from research.config import DataConfig
from research.data.corpus import sha256_file
from research.data.dedup import KeySet
from research.data.stream import (
    SIDECAR_KEYS,
    StreamData,
    _atomic_json,
    _atomic_save,
    first_copies,
    part_name,
    prepared_folder,
)

MARKER = "dedup-parts.json"


def _sidecar(file: str) -> str:
    return file.replace(".npy", ".dedup.npy")


def _idx(file: str) -> str:
    return file.replace(".npy", ".idx.npy")


def _next_name(file: str) -> str:
    """train-p00001-00003.npy -> train-p00001-00003-d1.npy -> ...-d2.npy (a new name per
    rewrite, so the manifest never names a half-written file)."""
    stem = file[: -len(".npy")]
    found = re.fullmatch(r"(.*)-d(\d+)", stem)
    base, generation = (found[1], int(found[2])) if found else (stem, 0)
    return f"{base}-d{generation + 1}.npy"


def _drops(rows: np.ndarray, near: bool, seen: KeySet, bands: KeySet) -> tuple[np.ndarray, ...]:
    """(exact, near) masks of a shard's documents that meet a key of an earlier part."""
    exact = seen.contains(np.ascontiguousarray(rows[:, :8]).view(np.uint64).ravel())
    if not near:
        return exact, np.zeros_like(exact)
    keys = np.ascontiguousarray(rows[:, SIDECAR_KEYS:]).view(np.uint64)
    return exact, ~exact & bands.contains(keys).any(axis=1)


def _rewrite(folder: Path, shard: dict, keep: np.ndarray, rows: np.ndarray) -> dict:
    """Write the shard's kept documents under a new name; returns its new manifest entry."""
    tokens = np.load(folder / shard["file"], mmap_mode="r")
    offsets = np.load(folder / _idx(shard["file"]))
    lengths = np.diff(offsets)[keep]
    kept_tokens = np.concatenate(
        [tokens[a:b] for a, b in zip(offsets[:-1][keep], offsets[1:][keep], strict=True)]
        or [tokens[:0]]
    )
    nbytes = np.ascontiguousarray(rows[keep, 16:24]).view("<u8").ravel()
    name = _next_name(shard["file"])
    _atomic_save(folder / _idx(name), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    _atomic_save(folder / _sidecar(name), rows[keep])
    _atomic_save(folder / name, np.ascontiguousarray(kept_tokens))
    return {
        **shard,
        "file": name,
        "tokens": int(lengths.sum()),
        "docs": int(keep.sum()),
        "bytes": int(nbytes.sum()),
        "repeats": int((~first_copies(rows[keep])).sum()),
        "sha256": sha256_file(folder / name),
        "idx_sha256": sha256_file(folder / _idx(name)),
    }


def _remove_unlisted(folder: Path, manifest: dict) -> None:
    """Delete this part's train files its manifest no longer names (replaced shards)."""
    listed = set()
    for shard in manifest["splits"]["train"]:
        listed |= {shard["file"], _idx(shard["file"]), _sidecar(shard["file"])}
    for path in folder.glob(f"train-p{manifest['part']:05d}-*.npy"):
        if path.name not in listed:
            path.unlink()


def dedup_across_parts(cfg: DataConfig, num_parts: int, verbose: bool = True) -> dict:
    """Remove train documents that repeat or nearly repeat one kept by an earlier part, in the
    complete ``num_parts``-part prepare of ``cfg``; returns {"exact": n, "near": m} removed
    by this run (0 and 0 when a previous run finished the job)."""
    folder, _, _ = prepared_folder(cfg, num_parts)
    data = StreamData.open(folder)  # names the missing parts when some are not prepared yet
    near = cfg.near_dedup
    seen, bands = KeySet(), KeySet()
    removed = {"exact": 0, "near": 0}
    for manifest in data.parts:
        shards, new = [], {"exact": 0, "near": 0}
        kept_rows = []
        for shard in manifest["splits"]["train"]:
            rows = np.load(folder / _sidecar(shard["file"]))
            exact, close = _drops(rows, near, seen, bands)
            keep, first = ~(exact | close), first_copies(rows)
            if keep.all():
                shards.append(shard)
            else:
                shards.append(_rewrite(folder, shard, keep, rows))
                new["exact"] += int((exact & first).sum())  # a document, not its repeats
                new["near"] += int((close & first).sum())
            kept_rows.append(rows[keep & first])
        if new["exact"] or new["near"]:
            counts = manifest["removed"]
            across = counts.get("across_parts", {"exact": 0, "near": 0})
            shards = [s for s in shards if s["docs"]]
            manifest = {
                **manifest,
                "splits": {**manifest["splits"], "train": shards},
                "repeats": sum(s["repeats"] for s in shards),
                "removed": {
                    **counts,
                    "train": {k: counts["train"][k] + new[k] for k in new},
                    "across_parts": {k: across[k] + new[k] for k in new},
                },
            }
            _atomic_json(folder / f"{part_name(manifest['part'], num_parts)}.json", manifest)
        _remove_unlisted(folder, manifest)
        for rows in kept_rows:  # this part's documents now count as earlier for the next
            seen.add(np.ascontiguousarray(rows[:, :8]).view(np.uint64).ravel())
            if near:
                bands.add(np.ascontiguousarray(rows[:, SIDECAR_KEYS:]).view(np.uint64))
        removed = {k: removed[k] + new[k] for k in new}
        if verbose and (new["exact"] or new["near"]):
            print(f"dedup-parts: part {manifest['part']}: removed {new}")
    totals = {"exact": 0, "near": 0}
    for manifest in StreamData.open(folder).parts:
        across = manifest["removed"].get("across_parts", {})
        totals = {k: totals[k] + across.get(k, 0) for k in totals}
    _atomic_json(folder / MARKER, {"num_parts": num_parts, "removed": totals})
    if verbose:
        print(f"dedup-parts: {num_parts} parts in {folder}: removed {totals} across parts")
    return removed
