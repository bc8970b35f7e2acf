"""Llama-3-70B's shape: which TPU slices hold its training state and activations?

80 layers of 8192 wide, 64 query heads over 8 KV heads of 128, SwiGLU 28672, a 128256-token
vocabulary (untied), RoPE theta 500000, context 8192. For `research compile llama3_70b
--topology v5p-256` (README: Compiling for TPU pods); nothing here trains on a CPU. Layout as
MaxText's Llama-2-70B config on v5p: FSDP over the whole slice.
"""

from research.config import (
    DataConfig,
    ExperimentConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llama3_70b",
        model=ModelConfig(
            vocab_size=128256,
            d_model=8192,
            n_layers=80,
            n_heads=64,
            n_kv_heads=8,
            mlp_hidden=28672,
            seq_len=8192,
            tie_embeddings=False,
            rope_theta=500_000.0,
            norm_eps=1e-5,
            remat="full",
            scan_layers=True,
        ),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=1.5e-4, warmup_steps=2000, schedule="cosine", weight_decay=0.1),
        mesh=MeshConfig(data=1, fsdp=-1),
        train=TrainConfig(steps=1000, batch_size=128),
    )
