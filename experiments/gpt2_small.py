"""GPT-2 small (124M shape) with byte-level BPE at context 1024: throughput and MFU on a GPU.

The same shape as GPT-2-124M (12 layers, 12 heads, 768 wide, untied 50k vocabulary replaced by
our BPE vocabulary); on tinyshakespeare it is a throughput benchmark, not a converged model.
"""

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_small",
        model=ModelConfig(
            vocab_size=50304,
            d_model=768,
            n_layers=12,
            n_heads=12,
            seq_len=1024,
            mlp_hidden=2048,
            tie_embeddings=True,
        ),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="bpe", bpe_vocab_size=8192),
        optim=OptimConfig(lr=6e-4, warmup_steps=200, schedule="cosine", weight_decay=0.1),
        train=TrainConfig(
            steps=2000, batch_size=32, eval_every=500, checkpoint_every=500, eval_batches=20
        ),
    )
