"""Golden fixtures for the Hugging Face import/export tests, produced by `transformers` itself.

For every architecture the import supports, a tiny random-weight model (vocab 80, d_model 32,
2 layers) is built with transformers, its weights rounded to bfloat16 and saved in bfloat16
(small files; the f32 comparison is exact because the values are bf16-representable), and
transformers' own float32 logits for a 16-token prompt and its greedy 32-token continuation
are recorded in reference.npz. The import tests compare ours with them, without torch.

Export: a tiny model of ours (built from a seed) is exported with `research.hf.export`,
loaded back with transformers, and its logits and greedy continuation recorded; the export
test rebuilds the same model and compares.

Regenerate (needs torch + transformers, e.g. the /work/venv-hf virtual environment):
    PYTHONPATH=$PWD /work/venv-hf/bin/python tools/make_hf_fixtures.py
Output: tests/fixtures/hf/<arch>/ (config.json, *.safetensors, tokenizer.json, reference.npz).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, trainers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf"
VOCAB = 80
PROMPT_LEN, NEW_TOKENS = 16, 32
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

ARCHITECTURES = {
    # Llama 2 shape: untied head, plain RoPE.
    "llama2": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    # Llama 3.1/3.2 shape: tied embeddings (3.2 1B), per-frequency RoPE scaling, theta 500k.
    "llama3": (
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=True,
            rope_theta=500_000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    # Mistral: a sliding window shorter than prompt + continuation.
    "mistral": (transformers.MistralConfig, dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    # Qwen3: QK-norm and a head_dim that is not hidden / heads.
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=False)),
    "mixtral": (
        transformers.MixtralConfig,
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    ),
    # Qwen2-MoE: fine-grained experts (8 of width 16, top 4), two experts' worth of shared
    # expert behind a sigmoid gate, unnormalised top-k weights, MoE in every second layer (the
    # first is dense); saved in several shards.
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            tie_word_embeddings=False,
        ),
    ),
}
SHARDED = {"qwen2_moe"}
# Seeds whose greedy continuation does not settle into repeating one token (a weak test).
SEEDS = {"qwen2_moe": 10}


def make_tokenizer() -> Tokenizer:
    """A character-level BPE of VOCAB tokens trained on a bit of tinyshakespeare."""
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare"
    text_file = next(p for p in sorted(corpus.rglob("*")) if p.is_file())
    text = text_file.read_text()[:20_000]
    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False)
    tok.train_from_iterator([text[i : i + 200] for i in range(0, len(text), 200)], trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


def randomize(model: torch.nn.Module, seed: int, tied: bool) -> None:
    """Weights large enough that logits are spread and greedy decoding does not repeat one
    token; every value rounded to bfloat16 so the bf16 files hold them exactly. Tied
    embeddings are small, else each token's own embedding dominates its logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.3 * noise
            elif "embed" in name:
                value = noise * (0.1 if tied else 1.0)
            else:
                value = noise / p.shape[-1] ** 0.5
            p.copy_(value.to(torch.bfloat16).float())


def reference(folder: Path, prompt: np.ndarray) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return dict(input_ids=prompt, logits=logits, greedy=out[0, len(prompt) :].numpy())


def make_import_fixture(name: str, tokenizer: Tokenizer, seed: int) -> None:
    config_cls, extra = ARCHITECTURES[name]
    config = config_cls(**(COMMON | extra))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed, config.tie_word_embeddings)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    shard = "16KB" if name in SHARDED else "10MB"
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
    tokenizer.save(str(folder / "tokenizer.json"))
    prompt = np.random.default_rng(seed).integers(0, VOCAB, PROMPT_LEN).astype(np.int32)
    np.savez_compressed(folder / "reference.npz", **reference(folder, prompt))
    print(f"{name}: {sum(f.stat().st_size for f in folder.iterdir()) / 1e3:.0f} kB")


def make_export_fixture(name: str, tokenizer: Tokenizer) -> None:
    """Our model exported with research.hf.export, then loaded and run by transformers."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import EXPORTS, export_model

    from research.data.tokenizer import BPETokenizer
    from research.hf.export import export_hf

    _, params = export_model(name)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    export_hf(EXPORTS[name].resolved(), params, folder, BPETokenizer(tokenizer), "bfloat16")
    prompt = np.random.default_rng(99).integers(0, VOCAB, PROMPT_LEN).astype(np.int32)
    np.savez_compressed(folder / "reference.npz", **reference(folder, prompt))
    print(f"{name}: {sum(f.stat().st_size for f in folder.iterdir()) / 1e3:.0f} kB")


def main(names: list[str]) -> None:
    tokenizer = make_tokenizer()
    for index, name in enumerate(ARCHITECTURES):
        if not names or name in names:
            make_import_fixture(name, tokenizer, SEEDS.get(name, index))
    for name in ("export_dense", "export_moe"):
        if not names or name in names:
            make_export_fixture(name, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
