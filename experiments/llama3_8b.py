"""Llama-3-8B's shape: does it train on a TPU pod slice, and with which layout?

32 layers of 4096 wide, 32 query heads over 8 KV heads of 128, SwiGLU 14336, a 128256-token
vocabulary (untied), RoPE theta 500000, context 8192. For `research compile llama3_8b --topology
v5p-128` (README: Compiling for TPU pods); the corpus is only there to resolve the config (its
character vocabulary is smaller than the model's), nothing here trains it on a CPU. Layout as
MaxText runs its Llama configs on v5p/v6e: FSDP over the whole slice, full remat.
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
        name="llama3_8b",
        model=ModelConfig(
            vocab_size=128256,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            mlp_hidden=14336,
            seq_len=8192,
            tie_embeddings=False,
            rope_theta=500_000.0,
            norm_eps=1e-5,
            remat="full",
            scan_layers=True,  # compile time of one block, not 32
        ),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, schedule="cosine", weight_decay=0.1),
        mesh=MeshConfig(data=1, fsdp=-1),
        # 1 sequence of 8192 per chip on 64 chips (v5p-128): 0.5M tokens per step
        train=TrainConfig(steps=1000, batch_size=64),
    )
