"""Batched generation: ours beside `transformers.generate`, same model and weights, one run.

    PYTHONPATH=$PWD /work/venv-hf/bin/python benchmarks/hf_generate.py          # CPU
    ... --d-model 512 --layers 8 --new-tokens 128                               # bigger

A random-weight Llama (transformers' own init) is saved as a Hugging Face folder, imported
with research.hf, and both decode the same 8 prompts of different lengths (left-padded,
greedy, every sequence forced to the full length). Prefill: the time to the first new token.
Decode tokens/s: (new tokens - 1) x 8 over the time after the first token, i.e.
(t[N tokens] - t[1 token]). Each side is warmed up first (ours: compiled per shape bucket;
theirs: torch's first-call set-up), then the median of --repeats runs is taken. Both use the
same CPU threads; the host's load is printed (shared machines: compare ratios in one run).
Also checks that both produce the same greedy tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()

    import torch
    import transformers

    if args.torch_threads:  # on a loaded host fewer threads can spin less
        torch.set_num_threads(args.torch_threads)

    from research.hf import load_hf
    from research.infer.generation import GenerationConfig, generate

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_model * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    theirs = theirs.eval()
    folder = tempfile.mkdtemp(prefix="hf-bench-")
    theirs.save_pretrained(folder)
    ours = load_hf(folder).model()

    rng = np.random.default_rng(0)
    lengths = np.linspace(16, 64, args.batch).astype(int)
    prompts = [rng.integers(0, args.vocab, n).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros((args.batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    def run_theirs(n: int) -> list[list[int]]:
        with torch.no_grad():
            out = theirs.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, width:].tolist()

    def run_ours(n: int) -> list[list[int]]:
        return generate(ours, prompts, GenerationConfig(max_new_tokens=n))

    def timed(fn, n: int) -> float:
        fn(n)  # warm-up: compile (ours) / first-call set-up (theirs)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(n)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    n = args.new_tokens
    results = {}
    for name, fn in (("transformers", run_theirs), ("ours", run_ours)):
        first, full = timed(fn, 1), timed(fn, n)
        prefill_tokens = int(sum(lengths))
        results[name] = dict(
            prefill_s=first,
            prefill_tok_s=prefill_tokens / first,
            decode_tok_s=args.batch * (n - 1) / max(full - first, 1e-9),
        )
    same = run_ours(n) == run_theirs(n)

    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}"
    )
    print(
        f"model: Llama d_model {args.d_model}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} KV), vocab {args.vocab}, float32; {args.batch} prompts of "
        f"{lengths.min()}-{lengths.max()} tokens, {n} new tokens each, greedy"
    )
    print(f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, r in results.items():
        print(f"{name:14}{r['prefill_tok_s']:15.0f}{r['decode_tok_s']:15.0f}")
    o, t = results["ours"], results["transformers"]
    print(
        f"ratio ours/transformers: prefill {o['prefill_tok_s'] / t['prefill_tok_s']:.2f}x, "
        f"decode {o['decode_tok_s'] / t['decode_tok_s']:.2f}x; same greedy tokens: {same}"
    )


if __name__ == "__main__":
    main()
