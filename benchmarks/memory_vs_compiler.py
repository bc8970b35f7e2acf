"""Our per-device memory estimate (research/train/memory.py) term by term beside the TPU
compiler's memory_analysis, for small layouts on an 8-chip slice (seconds each).

    PYTHONPATH=. python benchmarks/memory_vs_compiler.py [--topology v5p-16] [--only NAME]

Prints, per layout: the compiler's arguments / outputs (donated) / temporaries / code and its
total, our parameters / optimizer / gradients / activations / working set and total, and the
ratio estimate / compiler without its generated code (the estimate models data, not code).
Needs libtpu (the test extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = ["model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4", "model.n_layers=2",
         "model.seq_len=256", "model.vocab_size=4096", "train.batch_size=32"]  # fmt: skip
LAYOUTS = {
    "dense fsdp4 x tensor2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
    "dense data2 x fsdp4, remat full": [
        "mesh.data=2",
        "mesh.fsdp=4",
        "model.remat=full",
    ],  # fmt: skip
    "moe data2 x expert4": ["mesh.data=2", "mesh.expert=4", "model.n_experts=8", "model.top_k=2"],
    "moe fsdp2 x tensor2 x expert2, capacity": [
        "mesh.data=1",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "mesh.expert=2",
        "model.n_experts=8",
        "model.top_k=2",
        "model.moe_dispatch=capacity",
    ],  # fmt: skip
}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", default="v5p-16")
    parser.add_argument("--only", default="")
    parser.add_argument("--results", default="runs/memory_vs_compiler.json")
    parser.add_argument("--recompile", action="store_true")
    args = parser.parse_args()
    from research import runtime

    runtime.setup()
    from research.aot.compile import compile_run
    from research.aot.topology import parse_topology
    from research.backend import target_backend
    from research.config import load_experiment
    from research.run import build_run

    topology = parse_topology(args.topology)
    # The compiler's figures are kept (a compile takes minutes on a loaded 2-core machine), so
    # a change to the estimate is re-checked in seconds; --recompile refreshes them.
    cache = Path(args.results)
    compiled = json.loads(cache.read_text()) if cache.exists() and not args.recompile else {}
    print(f"{args.topology}, tiny experiment with {' '.join(SMALL)}; MiB per device")
    for name, overrides in LAYOUTS.items():
        if args.only and args.only not in name:
            continue
        cfg = load_experiment("tiny", [*SMALL, *overrides])
        key = f"{args.topology} {name}"
        if key not in compiled:
            compiled[key] = compile_run(cfg, topology, decode=False).steps[0].memory
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(compiled, indent=1))
        with target_backend("tpu"):
            est = build_run(cfg, "compile", devices=topology.devices()).memory
        m = compiled[key]
        data = m["argument"] + m["output"] - m["alias"] + m["temp"]
        print(
            f"{name}: compiler args {mib(m['argument'])} out {mib(m['output'])} (donated "
            f"{mib(m['alias'])}) temp {mib(m['temp'])} = {mib(data)} (+ code "
            f"{mib(m['generated_code'])}); estimate params {mib(est.params_bytes)} opt "
            f"{mib(est.optimizer_bytes)} grads {mib(est.gradient_bytes)} act "
            f"{mib(est.activation_bytes)} working {mib(est.working_bytes)} = "
            f"{mib(est.total_bytes)}; estimate / compiler without code "
            f"{est.total_bytes / data:.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
