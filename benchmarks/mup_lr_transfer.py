"""muP learning-rate transfer: is the best LR at width 64 still the best at widths 256 and 512?

    python benchmarks/mup_lr_transfer.py                   # writes docs/mup_lr_transfer.png
    python benchmarks/mup_lr_transfer.py --steps 100 --widths 64,256

A grid of Adam LRs (factors of 2) at each width, for the standard parametrisation and for muP
(base width 64), on tinyshakespeare characters: a 2-layer model (4 heads), context 32, batch
16, a short cosine schedule with 10 warmup steps, loss on the first 8 batches of the validation
split; data through the data package (char tokenizer, training loader, eval windows). Prints
each width's best LR and the grid, plots loss against LR.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research import runtime  # noqa: E402

runtime.setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from research.config import DataConfig, ModelConfig, OptimConfig  # noqa: E402
from research.data.loader import eval_batches, train_dataset  # noqa: E402
from research.data.shards import prepare  # noqa: E402
from research.models import Transformer  # noqa: E402
from research.models.loss import cross_entropy  # noqa: E402
from research.train.optimizer import make_optimizer  # noqa: E402

SEQ, BATCH, LAYERS, HEADS = 32, 16, 2, 4


def char_tokens() -> tuple[np.ndarray, np.ndarray, int]:
    """The quickstart's data: tinyshakespeare through the data package's char tokenizer and
    its train/val split (prepared once, cached like any run's)."""
    data = prepare(DataConfig(corpus="tinyshakespeare", tokenizer="char"), verbose=False)
    return data.tokens("train"), data.tokens("val"), data.vocab_size


def train_batches(ids: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The training loader's seeded batches (research/data/loader.py), the first ``count``."""
    stream = iter(train_dataset(ids, SEQ, BATCH, seed))
    return np.stack([next(stream) for _ in range(count)])


def val_batches(ids: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` full batches of the eval loader's windows over the val split."""
    return np.stack([batch for batch, _ in eval_batches(ids, SEQ, BATCH, max_batches=count)])


def final_losses(width, base, lrs, train_set, val_set, vocab) -> list[float]:
    """Val loss after training at each LR in ``lrs``, all LRs in one compiled, vmapped program.

    With weight decay 0, the optimizer's update is linear in the peak LR (clipping acts on the
    gradients before Adam; muP's per-layer scaling multiplies it), so the optimizer is built at
    LR 1 and its updates are scaled by each LR: one compile per width instead of one per LR."""
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=width,
        n_layers=LAYERS,
        n_heads=HEADS,
        seq_len=SEQ,
        tie_embeddings=False,
        mup_base_width=base,
    ).resolved()
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    optim = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, weight_decay=0.0)
    tx, _ = make_optimizer(optim, len(train_set), cfg.width_mult)

    def loss(params, batch):
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        return cross_entropy(logits, batch[:, 1:], 0.0)[0]

    def train_at(lr, params, all_batches):
        def body(carry, batch):
            params, opt_state = carry
            updates, opt_state = tx.update(jax.grad(loss)(params, batch), opt_state, params)
            updates = jax.tree.map(lambda u: lr * u, updates)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), all_batches)
        return jnp.mean(jax.vmap(lambda b: loss(params, b))(val_set))

    run = jax.jit(jax.vmap(train_at, in_axes=(0, None, None)))
    values = np.asarray(run(jnp.asarray(lrs, jnp.float32), params, jnp.asarray(train_set)))
    return [float(v) if np.isfinite(v) else float("inf") for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,256,512")
    parser.add_argument("--log2-lrs", default="-12,-11,-10,-9,-8,-7,-6,-5")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("docs/mup_lr_transfer.png"))
    parser.add_argument(
        "--only", choices=("standard", "muP"), help="one parametrisation (e.g. two processes)"
    )
    parser.add_argument("--from-logs", type=Path, nargs="+", help="report rows printed before")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [2.0 ** int(k) for k in args.log2_lrs.split(",")]
    if args.from_logs:
        report(grid_from_logs(args.from_logs), widths, lrs, args.steps, args.out)
        return
    train_ids, val_ids, vocab = char_tokens()
    train, val = train_batches(train_ids, args.steps, 0), val_batches(val_ids, 8)
    print(f"load average before: {os.getloadavg()}", flush=True)
    grid = {}
    for name, base in (("standard", 0), ("muP", widths[0])):
        if args.only and name != args.only:
            continue
        for width in widths:
            losses = final_losses(width, base, lrs, train, val, vocab)
            grid[name, width] = losses
            best = lrs[int(np.argmin(losses))]
            row = " ".join(f"{v:6.3f}" for v in losses)
            print(f"{name:<9} width {width:>4}: best lr 2^{np.log2(best):.0f}   {row}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    report(grid, widths, lrs, args.steps, args.out)


ROW = re.compile(r"^(standard|muP)\s+width\s+(\d+): best lr \S+\s+([\d.\sinf]+)$")


def grid_from_logs(paths: list[Path]) -> dict:
    """The rows this script printed (e.g. two --only processes), read back for the report."""
    grid = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if found := ROW.match(line.strip()):
                grid[found.group(1), int(found.group(2))] = [
                    float(v) for v in found.group(3).split()
                ]
    return grid


def report(grid: dict, widths: list[int], lrs: list[float], steps: int, out: Path) -> None:
    """Each parametrisation's drift of the best LR from the first width, and the plot."""
    names = [name for name in ("standard", "muP") if all((name, w) in grid for w in widths)]
    for name in names:
        best = [int(np.argmin(grid[name, w])) for w in widths]
        drift = max(abs(b - best[0]) for b in best)
        print(f"{name}: best LR moves by up to {drift} grid step(s) of 2x from width {widths[0]}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for width in widths:
            ax.plot(lrs, grid[name, width], "o-", label=f"d_model {width}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name}: val loss after {steps} steps")
        ax.set_xlabel("Adam LR")
    axes[0][0].set_ylabel("val loss")
    axes[0][0].set_ylim(top=min(4.0, axes[0][0].get_ylim()[1]))
    axes[0][0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
