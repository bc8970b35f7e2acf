"""muP coordinate check: activation and update sizes after a few Adam steps, widths 64..1024.

    python benchmarks/mup_coord_check.py                    # writes docs/mup_coord_check.png

Both parametrisations train the same 2-layer model (4 heads, head_dim growing with width) on
one fixed batch at the same Adam LR (1e-2, muP's base width 64). Printed and plotted per width:
the RMS of the last block's output and of the logits, and of how much each moved since
initialisation. Flat lines mean the LR tuned at width 64 means the same thing at every width.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research import runtime  # noqa: E402

runtime.setup()

from research.train.coord_check import METRICS, coordinate_check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,128,256,512,1024")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=Path("docs/mup_coord_check.png"))
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = {
        name: coordinate_check(widths, base, steps=args.steps, lr=args.lr)
        for name, base in (("standard", 0), ("muP", widths[0]))
    }
    print(f"load average after: {os.getloadavg()}")
    print(f"after {args.steps} steps at lr {args.lr}: RMS by width")
    print(f"{'param.':<10}{'metric':<15}" + "".join(f"{w:>9}" for w in widths))
    for name, by_width in results.items():
        for metric in METRICS:
            values = "".join(f"{by_width[w][metric][-1]:9.3f}" for w in widths)
            print(f"{name:<10}{metric:<15}{values}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(METRICS), figsize=(4 * len(METRICS), 6.5), sharex=True)
    for row, (name, by_width) in enumerate(results.items()):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            for step in range(args.steps):
                ax.plot(widths, [by_width[w][metric][step] for w in widths], "o-", label=step + 1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{name}: {metric}")
            if row == 1:
                ax.set_xlabel("d_model")
    axes[0][0].legend(title="step")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
