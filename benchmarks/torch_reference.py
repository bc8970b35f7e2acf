"""The reference for CPU throughput: a nanoGPT-architecture GPT in PyTorch eager, written here.

Same architecture and recipe as nanoGPT's documented CPU run on shakespeare_char (learned
position embeddings, LayerNorm without bias, GELU MLP 4x, tied embeddings, causal SDPA,
AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, beta2 0.99, weight decay 0.1 on
matrices, clip 1.0, dropout 0), so it can be timed beside ours in one run on one machine. Needs
torch (`pip install torch`); the benchmarks fall back to the published figure without it.
"""

from __future__ import annotations

import math
import time

import numpy as np


def build_reference(vocab: int, n_layers: int, n_heads: int, d_model: int, seq_len: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d_model, bias=False)
            self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
            self.proj = nn.Linear(d_model, d_model, bias=False)
            self.ln2 = nn.LayerNorm(d_model, bias=False)
            self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
            self.out = nn.Linear(4 * d_model, d_model, bias=False)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d_model, dim=2)
            q, k, v = (z.view(b, t, n_heads, c // n_heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, d_model)
            self.pos = nn.Embedding(seq_len, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d_model, bias=False)
            self.head = nn.Linear(d_model, vocab, bias=False)
            self.head.weight = self.tok.weight
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    return GPT()


def run_reference(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    vocab: int,
    steps: int,
    batch: int = 12,
    seq_len: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    d_model: int = 128,
    eval_every: int = 0,
    seed: int = 1337,
) -> dict:
    """Train the reference; returns ms/iteration (steady state), tokens/s, wall time, val loss."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_reference(vocab, n_layers, n_heads, d_model, seq_len)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
    )

    def lr_at(it: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = (it - 100) / max(1, steps - 100)
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (1e-3 - 1e-4)

    def get_batch(tokens):
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
        rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])

    def val_loss() -> float:
        model.eval()
        n = (len(val_tokens) - 1) // seq_len
        total, count = 0.0, 0
        with torch.no_grad():
            for first in range(0, n, 64):
                idx = np.arange(first, min(n, first + 64)) * seq_len
                rows = np.stack([val_tokens[s : s + seq_len + 1] for s in idx]).astype(np.int64)
                x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
                total += model(x, y).item() * len(idx)
                count += len(idx)
        model.train()
        return total / count

    start = time.perf_counter()
    steady_start, steady_steps = None, 0
    for it in range(steps):
        if it == min(20, steps // 10):  # skip the first iterations' warmup allocation costs
            steady_start, steady_steps = time.perf_counter(), 0
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        x, y = get_batch(train_tokens)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steady_steps += 1
        if eval_every and (it + 1) % eval_every == 0 and it + 1 < steps:
            val_loss()
    steady = (time.perf_counter() - steady_start) / max(1, steady_steps)
    final_val = val_loss()
    return {
        "ms_per_step": 1e3 * steady,
        "tokens_per_second": batch * seq_len / steady,
        "wall_seconds": time.perf_counter() - start,
        "val_loss": final_val,
        "threads": torch.get_num_threads(),
    }
