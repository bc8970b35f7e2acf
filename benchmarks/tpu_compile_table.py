"""The README's TPU table: big models compiled for pod slices by the TPU compiler, on any machine.

    python benchmarks/tpu_compile_table.py [--only llama3_8b] [--results FILE]

Each row is `research compile EXPERIMENT --topology T --no-decode` with the layout below (the
experiment files' FSDP over the whole slice, full remat, one sequence of the model's context per
chip; Mixtral's 8 of 1024 as MaxText's v6e-256 config): the compiler's per-device train-step
memory against the chip's HBM, and our estimate beside it. Rows are appended to --results
(JSON lines) as they finish and skipped when already there, so an interrupted run resumes.
Needs libtpu; big compiles take minutes each on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPOLOGIES = ("v5p-64", "v5p-128", "v5p-256", "v6e-256")
SEQUENCES_PER_CHIP = {"gpt2_small": 8, "llama3_8b": 1, "llama3_70b": 1, "mixtral_8x7b": 8}
LAYOUT = {  # row name: (experiment, overrides); the same layout on every slice: FSDP over all
    "gpt2_small": (
        "gpt2_small",
        ["mesh.data=1", "mesh.fsdp=-1", "model.remat=full", "model.scan_layers=true"],
    ),
    "llama3_8b": ("llama3_8b", []),
    "llama3_70b": ("llama3_70b", []),
    "mixtral_8x7b": ("mixtral_8x7b", []),  # dropless (ragged_dot), TPU's auto
    "mixtral_8x7b_capacity": ("mixtral_8x7b", ["model.moe_dispatch=capacity"]),
}


def rows(only: list[str]):
    """(experiment, topology, overrides) in the order asked: NAME (every slice) or NAME:SLICE."""
    for item in only or list(LAYOUT):
        name, _, topology = item.partition(":")
        for topo in [topology] if topology else TOPOLOGIES:
            yield name, topo, LAYOUT[name][1]


def estimates(results: Path) -> int:
    """Our current estimate beside each compiled row's figures (the compiler's without code)."""
    from research.aot.topology import parse_topology
    from research.backend import target_backend
    from research.config import load_experiment
    from research.run import build_run

    for r in map(json.loads, results.open()):
        if "error" in r:
            continue
        topology = parse_topology(r["topology"])
        overrides = [*LAYOUT[r["experiment"]][1], f"train.batch_size={r['batch']}"]
        cfg = load_experiment(LAYOUT[r["experiment"]][0], overrides)
        with target_backend("tpu"):
            est = build_run(cfg, "compile", devices=topology.devices()).memory
        m = r["memory"]
        data = (m["argument"] + m["output"] - m["alias"] + m["temp"]) / 2**30
        total = est.total_bytes / 2**30
        print(
            f"{r['experiment']} {r['topology']}: compiler {data:.2f} GiB without code "
            f"(code {m['generated_code'] / 2**20:.0f} MiB), estimate {total:.2f} GiB "
            f"({total / data:.2f}x; activations {est.activation_bytes / 2**30:.2f}, working "
            f"{est.working_bytes / 2**30:.2f})",
            flush=True,
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--only", default="", help="comma-separated NAME or NAME:SLICE, in the order to run"
    )
    parser.add_argument("--results", default="runs/tpu_compile_table.jsonl")
    parser.add_argument(
        "--estimates",
        action="store_true",
        help="only recompute our estimate for the rows already in --results (no compiling: "
        "seconds), printing estimate / compiler without code per row",
    )
    args = parser.parse_args()
    from research import runtime

    runtime.setup()
    from research.aot.compile import compile_run
    from research.aot.topology import parse_topology
    from research.config import load_experiment

    results = Path(args.results)
    if args.estimates:
        return estimates(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if results.exists():
        done = {(r["experiment"], r["topology"]) for r in map(json.loads, results.open())}
    for name, topo_name, overrides in rows(list(filter(None, args.only.split(",")))):
        if (name, topo_name) in done:
            continue
        topology = parse_topology(topo_name)
        experiment = LAYOUT[name][0]
        batch = topology.chips * SEQUENCES_PER_CHIP[experiment]
        cfg = load_experiment(experiment, [*overrides, f"train.batch_size={batch}"])
        started = time.perf_counter()
        try:
            report = compile_run(cfg, topology, decode=False)
        except Exception as error:  # a layout the compiler refuses is a row too
            row = {"experiment": name, "topology": topo_name, "error": str(error)[:300]}
        else:
            step = report.steps[0]
            row = {
                "experiment": name,
                "topology": topo_name,
                "batch": batch,
                "mesh": report.mesh,
                "compiled_gib": step.total_bytes / 2**30,
                "memory": step.memory,
                "hbm_gib": topology.hbm_bytes / 2**30,
                "fits": report.fits,
                "estimate_gib": report.estimate.total_bytes / 2**30,
                "compile_s": step.seconds,
            }
            if step.refused:  # the compiler's own out-of-memory message
                row["refused"] = step.refused[:500]
        row["wall_s"] = time.perf_counter() - started
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("| model | slice | batch x seq | compiled GiB/chip | HBM GiB | fits | our estimate GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in map(json.loads, results.open()):
        if "error" in r:
            print(f"| {r['experiment']} | {r['topology']} | - | error: {r['error'][:80]} | | | |")
            continue
        seq = load_experiment(LAYOUT[r["experiment"]][0]).model.seq_len
        print(
            f"| {r['experiment']} | {r['topology']} | {r['batch']} x {seq} | "
            f"{r['compiled_gib']:.1f} | {r['hbm_gib']:.0f} | {'yes' if r['fits'] else 'NO'} | "
            f"{r['estimate_gib']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
