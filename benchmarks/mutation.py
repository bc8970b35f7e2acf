"""Planted mutations of the core math: does the test suite notice each one?

    python benchmarks/mutation.py              # every mutant; prints killed / survived
    python benchmarks/mutation.py --only moe   # mutants whose name contains "moe"
    python benchmarks/mutation.py --list       # the mutants and the tests each one runs

Each mutant is one source-text replacement (a plausible bug: an off-by-one in a mask, a
floor for a ceil, a forgotten normalisation) in MoE dispatch and balancing, the attention masks
(the ``xla`` reference, the flash kernels' element masks and block classes, the online
softmax) and the training losses. The repository's ``research/``, ``tests/`` and
``experiments/`` are copied into a temporary directory once; for each mutant the one file is
rewritten there, the selected tests run against the copy (``PYTHONPATH`` points at it, ``-x``
stops at the first failure), and the file is restored. The working tree is never modified, so
an interrupted run leaves nothing behind. Before the mutants, each distinct test selection runs
once unmutated and must pass: otherwise "killed" would mean nothing.

A survivor is either a gap in the tests (add a test that fails on it) or an equivalent mutant
(same results by construction); the README's "Mutation testing" section lists the survivors
of the last run and why each one is harmless.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("research", "tests", "experiments", "pyproject.toml", "setup.cfg")

MOE = "research/models/moe.py"
ATTN = "research/models/attention.py"
COMMON = "research/kernels/flash_attention/common.py"
TILES = "research/kernels/flash_attention/tiles.py"
STEP = "research/train/step.py"
LOSS = "research/models/loss.py"
EVAL = "research/infer/evaluate.py"

# Test selections: (files, -k expression). Training tests are left out where faster ones
# cover the same code; -x makes a killed mutant cheap, so a survivor pays the whole selection.
DISPATCH = (  # test ids run in the order given: the likeliest killers first
    " ".join(
        f"tests/test_moe.py::test_{name}"
        for name in (
            "capacity_dispatch_matches_first_choices_first_loop",
            "first_choices_beat_earlier_tokens_second_choices",
            "capacity_rounds_up_and_counts_every_choice",
            "capacity_mode_drops_exactly_the_overflow",
            "dispatch_matches_per_token_loop",
            "one_expert_top1_dropless_equals_dense_swiglu",
        )
    ),
    "",
)
ROUTER = ("tests/test_moe.py", "per_token or aux or gradients or gather")
ATTN_TESTS = (
    "tests/test_model.py tests/test_flash_attention.py",
    "attention or causality or cache or (blockwise and matches)",
)
MASK_TESTS = ("tests/test_flash_attention.py", "blockwise or block_classes")
KERNEL_TESTS = ("tests/test_flash_attention.py", "mosaic and (matches or masked)")
LOSS_TESTS = ("tests/test_losses.py", "")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, str]


MUTANTS = [
    # --- MoE: priority, capacity, dispatch, dropped fraction ---
    Mutant("moe-priority-token-major", MOE,
           "position = _queue_position(by_rank, n)",
           "position = _queue_position(experts.reshape(-1), n).reshape(n_tokens, k).T.reshape(-1)",
           DISPATCH),
    Mutant("moe-capacity-floor", MOE,
           "math.ceil(factor * n_tokens * top_k / n_experts)",
           "math.floor(factor * n_tokens * top_k / n_experts)", DISPATCH),
    Mutant("moe-capacity-ignores-top-k", MOE,
           "factor * n_tokens * top_k / n_experts", "factor * n_tokens / n_experts", DISPATCH),
    Mutant("moe-capacity-keeps-one-extra", MOE,
           "keep = position < capacity", "keep = position <= capacity", DISPATCH),
    Mutant("moe-dropped-per-token-any", MOE,
           "dropped = jnp.mean(~keep, dtype=jnp.float32)",
           "dropped = jnp.mean(~keep.reshape(k, n_tokens).all(0), dtype=jnp.float32)", DISPATCH),
    Mutant("moe-dropped-per-token-all", MOE,
           "dropped = jnp.mean(~keep, dtype=jnp.float32)",
           "dropped = jnp.mean(~keep.reshape(k, n_tokens).any(0), dtype=jnp.float32)", DISPATCH),
    Mutant("moe-queue-position-from-one", MOE,
           "(jnp.cumsum(one_hot, axis=0) - 1)", "jnp.cumsum(one_hot, axis=0)", DISPATCH),
    Mutant("moe-slot-layout", MOE,
           "by_rank * capacity + position, n * capacity",
           "position * n + by_rank, n * capacity", DISPATCH),
    Mutant("moe-capacity-combine-unweighted", MOE,
           'combined = jnp.einsum("ktd,tk->td", per_assignment, '
           "weights.astype(per_assignment.dtype))",
           "combined = per_assignment.sum(0)", DISPATCH),
    Mutant("moe-dropless-no-block-padding", MOE,
           "padded = (counts + block - 1) // block * block", "padded = counts", ROUTER),
    Mutant("moe-ragged-unsorted", MOE,
           "order = jnp.argsort(flat, stable=True)", "order = jnp.arange(flat.shape[0])",
           ROUTER),
    Mutant("moe-gather-grad-first-copy-only", MOE,
           "return padded[inverse].sum(axis=1), None, None",
           "return padded[inverse][:, 0], None, None", ROUTER),
    # --- MoE: router and balancing ---
    Mutant("moe-no-renormalise", MOE,
           "weights = weights / jnp.sum(weights, axis=-1, keepdims=True)", "weights = weights",
           ROUTER),
    Mutant("moe-bias-in-weights", MOE,
           "weights = jnp.take_along_axis(scores, experts, axis=-1)",
           "weights = jnp.take_along_axis(biased, experts, axis=-1)", ROUTER),
    Mutant("moe-sigmoid-probs-unnormalised", MOE,
           "probs = scores / jnp.sum(scores, axis=-1, keepdims=True)", "probs = scores",
           ROUTER),
    Mutant("moe-balance-loss-without-n", MOE,
           '"load_balance_loss": n * jnp.sum(load * importance)',
           '"load_balance_loss": jnp.sum(load * importance)', ROUTER),
    Mutant("moe-load-per-token", MOE,
           "load = counts / jnp.sum(counts)", "load = counts / logits.shape[0]", ROUTER),
    Mutant("moe-z-loss-not-squared", MOE,
           "jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)",
           "jnp.mean(jax.nn.logsumexp(logits, axis=-1))", ROUTER),
    Mutant("moe-entropy-sign", MOE,
           "entropy = -jnp.mean(", "entropy = jnp.mean(", ROUTER),
    Mutant("moe-bias-step-sign", MOE,
           "jnp.sign(jnp.mean(loads, axis=-1, keepdims=True) - loads)",
           "jnp.sign(loads - jnp.mean(loads, axis=-1, keepdims=True))", ROUTER),
    # --- attention: the xla reference ---
    Mutant("xla-causal-strict", ATTN,
           "visible &= kv_positions[None, :] <= q_positions[:, None]",
           "visible &= kv_positions[None, :] < q_positions[:, None]", ATTN_TESTS),
    Mutant("xla-window-one-wider", ATTN,
           "visible &= kv_positions[None, :] > q_positions[:, None] - window",
           "visible &= kv_positions[None, :] >= q_positions[:, None] - window", ATTN_TESTS),
    Mutant("xla-empty-slots-visible", ATTN,
           "visible = kv_positions[None, :] >= 0", "visible = kv_positions[None, :] >= -1",
           ATTN_TESTS),
    Mutant("xla-segments-ignored", ATTN,
           "visible = visible & (q_segment_ids[:, None, :, None] == "
           "kv_segment_ids[:, None, None, :])",
           "visible = visible", ATTN_TESTS),
    Mutant("xla-scale-by-d", ATTN,
           "1.0 / math.sqrt(head_dim)", "1.0 / head_dim", ATTN_TESTS),
    Mutant("xla-gqa-interleaved-groups", ATTN,
           "q = q.reshape(batch, q_len, n_kv, n_heads // n_kv, head_dim)",
           "q = q.reshape(batch, q_len, n_heads // n_kv, n_kv, head_dim).swapaxes(2, 3)",
           ATTN_TESTS),
    Mutant("attend-cudnn-takes-windows", ATTN,
           "plain_causal = q.shape[1] == k.shape[1] and not window and segment_ids is None",
           "plain_causal = q.shape[1] == k.shape[1] and segment_ids is None", ATTN_TESTS),
    # --- flash attention: element masks and block classes ---
    Mutant("flash-causal-strict", COMMON,
           "ok &= kv_pos <= q_pos", "ok &= kv_pos < q_pos", MASK_TESTS),
    Mutant("flash-window-one-wider", COMMON,
           "ok &= kv_pos > q_pos - window", "ok &= kv_pos >= q_pos - window", MASK_TESTS),
    Mutant("flash-padding-visible", COMMON,
           "ok = kv_pos >= 0", "ok = kv_pos >= -1", MASK_TESTS),
    Mutant("flash-segments-ignored", COMMON,
           "ok &= q_seg == kv_seg", "ok &= q_seg == q_seg", MASK_TESTS),
    Mutant("flash-skip-causal-diagonal", COMMON,
           "skip |= k_pmin > q_pmax", "skip |= k_pmin >= q_pmax", MASK_TESTS),
    Mutant("flash-full-causal-loose", COMMON,
           "full &= k_pmax <= q_pmin", "full &= k_pmax <= q_pmax", MASK_TESTS),
    Mutant("flash-skip-window-edge", COMMON,
           "skip |= k_pmax <= q_pmin - window", "skip |= k_pmax <= q_pmin - window + 1",
           MASK_TESTS),
    Mutant("flash-full-window-loose", COMMON,
           "full &= k_pmin > q_pmax - window", "full &= k_pmin >= q_pmax - window", MASK_TESTS),
    Mutant("flash-skip-segments-touching", COMMON,
           "skip |= (k_smax < q_smin) | (k_smin > q_smax)",
           "skip |= (k_smax <= q_smin) | (k_smin > q_smax)", MASK_TESTS),
    Mutant("flash-full-segments-loose", COMMON,
           "full &= (q_smin == q_smax) & (k_smin == k_smax) & (q_smin == k_smin)",
           "full &= q_smin == k_smin", MASK_TESTS),
    Mutant("flash-full-with-padding", COMMON,
           "full = k_raw >= 0", "full = k_raw >= -1", MASK_TESTS),
    Mutant("flash-kernel-masked-weights-kept", TILES,
           "    if ok is not None:  # a row with nothing visible yet has m_new = MASK: keep its "
           "weights 0\n        w = jnp.where(ok, w, 0.0)\n", "", KERNEL_TESTS),
    Mutant("flash-kernel-empty-rows-divide", TILES,
           "safe = jnp.where(denom > 0, denom, 1.0)", "safe = denom", KERNEL_TESTS),
    Mutant("flash-kernel-no-rescale", TILES,
           "acc = acc * alpha + dot_nn", "acc = acc + dot_nn", KERNEL_TESTS),
    # --- losses and the train/eval steps ---
    Mutant("loss-targets-not-shifted", STEP,
           "cross_entropy(logits, micro_batch[:, 1:], z_loss)",
           "cross_entropy(logits, micro_batch[:, :-1], z_loss)", LOSS_TESTS),
    Mutant("loss-z-loss-not-squared", LOSS,
           "z_loss * jnp.mean(log_z**2)", "z_loss * jnp.mean(log_z)", LOSS_TESTS),
    Mutant("loss-z-loss-dropped", LOSS,
           "return ce + z_loss * jnp.mean(log_z**2), ce", "return ce, ce", LOSS_TESTS),
    Mutant("loss-z-loss-in-reported-ce", LOSS,
           "return ce + z_loss * jnp.mean(log_z**2), ce",
           "ce = ce + z_loss * jnp.mean(log_z**2)\n    return ce, ce", LOSS_TESTS),
    Mutant("loss-balance-coefficient-swapped", STEP,
           'model_cfg.router_aux_loss * aux["load_balance_loss"]',
           'model_cfg.router_aux_loss * aux["router_z_loss"]', LOSS_TESTS),
    Mutant("loss-accumulation-sums-grads", STEP,
           "grads, ce, aux = jax.tree.map(lambda x: x / accum, (grads, ce, aux))",
           "ce, aux = jax.tree.map(lambda x: x / accum, (ce, aux))", LOSS_TESTS),
    Mutant("eval-counts-padding-row", EVAL,
           "valid = (jnp.arange(batch.shape[0]) < rows)[:, None]",
           "valid = (jnp.arange(batch.shape[0]) <= rows)[:, None]", LOSS_TESTS),
    Mutant("eval-token-count-off-by-one", EVAL,
           "valid.sum() * (batch.shape[1] - 1)", "valid.sum() * batch.shape[1]", LOSS_TESTS),
]  # fmt: skip


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, dest / name)


def run_tests(tree: Path, tests: tuple[str, str], timeout: float) -> tuple[int, float, str]:
    """pytest on the copy; (return code, seconds, last line of output). 124: timed out."""
    files, keyword = tests
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += ["--basetemp", str(tree / ".pytest-tmp"), *files.split()]
    if keyword:
        command += ["-k", keyword]
    env = {**os.environ, "PYTHONPATH": str(tree), "RESEARCH_COMPILE_CACHE": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 124, time.perf_counter() - start, "timed out"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default="", help="comma-separated: run mutants whose name contains one of these"
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    args = parser.parse_args()
    wanted = args.only.split(",")
    mutants = [m for m in MUTANTS if any(part in m.name for part in wanted)]
    if not mutants:
        parser.error(f"--only {args.only!r} matches no mutant; see --list")
    if args.list:
        for m in mutants:
            print(f"{m.name:36s} {m.path:45s} {m.tests[0]} -k {m.tests[1]!r}")
        return 0
    for m in mutants:  # a stale mutant (the code moved on) is an error, not a silent "survived"
        count = (ROOT / m.path).read_text().count(m.old)
        if count != 1:
            sys.exit(f"mutant {m.name}: its text occurs {count} times in {m.path}, not once; "
                     "update it in benchmarks/mutation.py")  # fmt: skip

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill: still remove the copy
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in mutants):
                code, seconds, last = run_tests(tree, tests, args.timeout)
                print(f"baseline {tests[0]} -k {tests[1]!r}: {last} ({seconds:.0f} s)", flush=True)
                if code != 0:
                    sys.exit("the unmutated tests fail: fix them before mutating")
        rows = []
        print("\n| mutant | file | result | s |\n|---|---|---|---|", flush=True)
        for m in mutants:
            target = tree / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            try:
                code, seconds, last = run_tests(tree, m.tests, args.timeout)
            finally:
                target.write_text(original)
            result = {0: "SURVIVED", 1: "killed", 5: "no tests ran", 124: "timed out"}.get(
                code, f"error (exit {code})"
            )
            rows.append((m, result))
            print(f"| {m.name} | {Path(m.path).name} | {result} | {seconds:.0f} |", flush=True)
    survivors = [m.name for m, result in rows if result != "killed"]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} killed; not killed: "
          f"{', '.join(survivors) or 'none'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
