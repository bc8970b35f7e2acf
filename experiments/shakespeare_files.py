"""Does the streamed many-file path train? tinyshakespeare split into 16 files (8 JSONL.gz, 8
Parquet), prepared by `research prepare` (dedup, BPE on a sample, token shards) and trained on
packed documents with segment ids, beside the character-level quickstart's small model.

The files are made from the corpus on first use (``make_files``; 1 MB, a second) in the cache,
``<cache>/corpora/tinyshakespeare-files``; each blank-line-separated passage is a document.
"""

import gzip
import json
from pathlib import Path

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from research.data.corpus import cache_root, read_text, resolve_corpus


def make_files(folder: Path, files: int = 16) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = read_text(resolve_corpus("tinyshakespeare"), "\n\n")
    docs = [d for d in text.split("\n\n") if d.strip()]
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        part = docs[i::files]
        if i % 2:
            pq.write_table(pa.table({"text": part}), tmp / f"part-{i:02d}.parquet")
        else:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in part)
            (tmp / f"part-{i:02d}.jsonl.gz").write_bytes(gzip.compress(lines.encode(), mtime=0))
    tmp.rename(folder)


def config() -> ExperimentConfig:
    folder = cache_root() / "corpora" / "tinyshakespeare-files"
    if not folder.exists():
        make_files(folder)
    return ExperimentConfig(
        name="shakespeare_files",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, seq_len=128),
        data=DataConfig(
            sources=str(folder), tokenizer="bpe", bpe_vocab_size=2048, val_fraction=0.05
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, schedule="wsd"),
        train=TrainConfig(
            steps=600, batch_size=16, eval_every=200, eval_batches=20, checkpoint_every=200
        ),
    )
