"""A Mixtral-8x7B-shaped MoE: does it train on a TPU pod slice, and with which layout?

32 layers of 4096 wide, 32 query heads over 8 KV heads of 128, 8 SwiGLU experts of 14336 with
top-2 routing in every layer, a 32000-token vocabulary (untied), RoPE theta 1e6. Context 1024
and full remat as MaxText's Mixtral-8x7B config for v6e-256 (FSDP over the whole slice); ours
routes dropless (ragged_dot) on TPU. For `research compile mixtral_8x7b --topology v6e-256`.
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
        name="mixtral_8x7b",
        model=ModelConfig(
            vocab_size=32000,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            mlp_hidden=14336,
            n_experts=8,
            top_k=2,
            seq_len=1024,
            tie_embeddings=False,
            rope_theta=1_000_000.0,
            norm_eps=1e-5,
            remat="full",
            scan_layers=True,
        ),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, schedule="cosine", weight_decay=0.1),
        mesh=MeshConfig(data=1, fsdp=-1),
        # 8 sequences of 1024 per chip on 256 chips
        train=TrainConfig(steps=1000, batch_size=2048),
    )
