"""`research compile`: compile an experiment's steps for a TPU slice, on any machine.

Imports of JAX and the heavy modules happen inside the handler, after runtime.setup().
"""

from __future__ import annotations

import argparse

from research.cli_types import non_negative_int

FITS, DOES_NOT_FIT = 0, 1  # exit statuses (2 is a mistake in the input, as everywhere)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _size(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else _gib(n)


def format_report(report) -> str:
    """The report as the command prints it."""
    topo = report.topology
    hbm = topo.hbm_bytes
    lines = [
        f"{topo.name}: {topo.chips} chips of {topo.hardware.name} ({topo.physical}, "
        f"{topo.slices} slice{'s' if topo.slices > 1 else ''}), HBM {_gib(hbm)} per chip; "
        f"mesh {report.mesh}",
    ]
    for step in report.steps:
        m = step.memory
        if step.refused:
            lines.append(f"{step.name}: the TPU compiler refused it: {step.refused}")
            continue
        share = step.total_bytes / hbm
        lines.append(
            f"{step.name} (compiled in {step.seconds:.1f} s), per device: arguments "
            f"{_size(m['argument'])}, outputs {_size(m['output'])} (donated {_size(m['alias'])}),"
            f" temporaries {_size(m['temp'])}, generated code {_size(m['generated_code'])}; "
            f"total {_size(step.total_bytes)} = {share:.0%} of HBM"
        )
        if step.flops is not None:
            lines.append(f"  FLOPs per step per device (XLA): {step.flops:.3e}")
        if step.collectives is None:
            lines.append("  collectives: not readable (this libtpu cannot print the program)")
        elif step.collectives:
            ops = ", ".join(
                f"{op} x{count} ({_size(size)})"
                for op, (count, size) in sorted(step.collectives.items())
            )
            lines.append(f"  collectives: {ops}")
        else:
            lines.append("  collectives: none")
    est, train = report.estimate, report.steps[0]
    if train.refused:
        train_size = f"needs over {_size(train.total_bytes)} of temporaries alone"
    else:  # the estimate models data, not the compiler's code
        train_size = f"{_size(train.data_bytes)} without its code"
    lines.append(
        f"our estimate (research/train/memory.py): {est.summary()}; compiler's train step "
        f"{train_size} ({est.total_bytes / max(train.data_bytes, 1):.2f}x)"
    )
    lines.append(
        f"model FLOPs per step per chip (6N + attention): {report.model_flops_per_device:.3e}"
    )
    if report.fits:
        lines.append(f"verdict: fits ({_size(hbm - train.total_bytes)} of HBM left per chip)")
    else:
        worst = max(s.total_bytes for s in report.steps)
        lines.append(
            f"verdict: does NOT fit ({_size(worst - hbm)} over per chip). What helps: "
            + "; ".join(report.knobs)
        )
    return "\n".join(lines)


def cmd_compile(args) -> int:
    from research.aot.compile import compile_run
    from research.aot.topology import parse_topology
    from research.config import load_experiment

    topology = parse_topology(args.topology)  # a bad name is refused before any work
    cfg = load_experiment(args.experiment, args.overrides)
    report = compile_run(cfg, topology, decode=not args.no_decode, decode_batch=args.decode_batch)
    print(format_report(report))
    return FITS if report.fits else DOES_NOT_FIT


def add_compile_command(sub, add_experiment_args) -> None:
    p = sub.add_parser(
        "compile",
        help="compile an experiment for a TPU slice (any machine): memory, FLOPs, fits or not",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  research compile gpt2_small --topology v5e-8\n"
        "  research compile llama3_8b --topology v5p-128 --set mesh.fsdp=-1\n"
        "  research compile llama3_8b --topology 2xv5p-128 --set mesh.data=2 "
        "--set mesh.fsdp=-1\n"
        "exit status: 0 fits, 1 does not fit, 2 a mistake in the input. Needs libtpu "
        "(pip install 'jax[tpu]').",
    )
    add_experiment_args(p)
    p.add_argument(
        "--topology",
        required=True,
        help="a Cloud TPU slice: v4-8 .. v4-8192, v5p-8 .., v5e-1 .. v5e-256, v6e-1 .. v6e-256; "
        "NxNAME for N slices",
    )
    p.add_argument("--no-decode", action="store_true", help="compile the train step only")
    p.add_argument(
        "--decode-batch",
        type=non_negative_int,
        default=0,
        help="sequences per decode step (default: the training microbatch)",
    )
    p.set_defaults(func=cmd_compile)
