"""GPT-2 small (124M shape) on a FineWeb-style Parquet folder: the web-scale data path end to end.

Point it at the data (a folder, glob or gs:// / s3:// URL of Parquet files with a `text`
column, e.g. a download of `HuggingFaceFW/fineweb` sample-10BT):

    FINEWEB=/data/fineweb/sample/10BT research prepare gpt2_fineweb --num-shards 64 --shard-index I
    FINEWEB=/data/fineweb/sample/10BT research train gpt2_fineweb

GPT-2's own tokenizer is used when ``GPT2_TOKENIZER`` names its tokenizer.json; otherwise a
50,257-token byte-level BPE is trained on the first 1 GB of text. Each document ends with
<|endoftext|>; training reads packed documents with segment ids.
"""

import os

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_fineweb",
        model=ModelConfig(
            vocab_size=50304, d_model=768, n_layers=12, n_heads=12, seq_len=1024, mlp_hidden=3072
        ),
        data=DataConfig(
            sources=os.environ.get("FINEWEB", "data/fineweb"),
            tokenizer="bpe",
            tokenizer_file=os.environ.get("GPT2_TOKENIZER", ""),
            bpe_vocab_size=50257,
            bpe_sample_bytes=1_000_000_000,
            val_fraction=0.001,
            bos_token="",
        ),
        optim=OptimConfig(lr=6e-4, warmup_steps=700, schedule="cosine", weight_decay=0.1),
        train=TrainConfig(
            steps=19073, batch_size=512, eval_every=1000, checkpoint_every=1000, eval_batches=20
        ),
    )
