"""Speculative decoding: speed-up over the target's own decoding at the measured acceptance.

    python benchmarks/speculative.py --target runs/target --draft runs/draft

Target and draft are two of our runs on the same tokenizer (or Hugging Face folders with the
same vocabulary). Both decode the same prompts greedily, one sequence at a time: the target
alone (research.infer.generation, KV cache, one jitted loop) and speculatively with the draft
proposing --k tokens per round. Prints tokens/s of each, the ratio, the draft's acceptance
rate, and checks the outputs are identical (greedy speculative decoding is exact). Warmed up
first (compiles excluded); the host and its load are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def load(path: str):
    """(model, tokenizer) of a run directory or a Hugging Face folder."""
    from flax import nnx

    from research.hf import is_hf_folder, load_hf

    if is_hf_folder(path):
        imported = load_hf(path)
        return imported.model(), imported.tokenizer
    from research.run import build_run, load_run_config

    run = build_run(load_run_config(Path(path)), "generate")
    return nnx.merge(run.graphdef, run.state["params"]), run.data.tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()

    from research.infer.generation import GenerationConfig, generate
    from research.infer.speculative import speculative_generate

    target, tokenizer = load(args.target)
    draft, _ = load(args.draft)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\n"
    starts = [text[i:] for i in range(args.prompts)]
    prompts = [tokenizer.encode(s).tolist() for s in starts]
    n = args.new_tokens
    config = GenerationConfig(max_new_tokens=n)

    def plain(p):
        return generate(target, [p], config)[0]

    def spec(p):
        return speculative_generate(target, draft, p, n, k=args.k)

    for p in prompts:  # compile every shape bucket the timed runs use
        plain(p), spec(p)
    start = time.perf_counter()
    reference = [plain(p) for p in prompts]
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    results = [spec(p) for p in prompts]
    spec_s = time.perf_counter() - start
    accepted = sum(s.accepted for _, s in results)
    drafted = sum(s.drafted for _, s in results)
    same = [out for out, _ in results] == reference
    tokens = n * len(prompts)
    load_avg = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}"
    )
    print(
        f"target {args.target}, draft {args.draft}, k={args.k}, {len(prompts)} prompts x {n} "
        "new tokens, greedy, one sequence at a time"
    )
    print(f"target alone:  {tokens / plain_s:8.1f} tokens/s")
    print(f"speculative:   {tokens / spec_s:8.1f} tokens/s")
    print(
        f"speed-up {plain_s / spec_s:.2f}x at acceptance {accepted / drafted:.2f} "
        f"({accepted}/{drafted} drafted tokens); identical output: {same}"
    )


if __name__ == "__main__":
    main()
