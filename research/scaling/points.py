"""Published scaling points from a CSV file (N, D or C, loss per row), as results rows that
`fits.fit_all` takes, so that someone else's runs can be refitted with the same code as ours.

Columns are matched case-insensitively; other columns are ignored:

- N: `n`, `params` or `parameters` (model parameters),
- D: `d` or `tokens` (training tokens), or C: `c`, `flops` or `compute` (training FLOPs),
  from which D = C / (6 N) (Chinchilla's C = 6 N D); with both, each is used as given,
- loss: `loss` or `val_loss` (final loss, nats per token).

Published points carry no IsoFLOP budgets and no training curves: approach 3 fits them,
approaches 1 and 2 say why they cannot.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from research.config import ConfigError

COLUMNS = {
    "n": ("n", "params", "parameters"),
    "d": ("d", "tokens"),
    "c": ("c", "flops", "compute"),
    "loss": ("loss", "val_loss"),
}
MIN_POINTS = 5  # approach 3 fits five parameters: E, A, B, alpha, beta


def _column(header: list[str], key: str) -> str | None:
    lowered = {name.strip().lower(): name for name in header}
    for alias in COLUMNS[key]:
        if alias in lowered:
            return lowered[alias]
    return None


def _number(row: dict, column: str, line: int, path: Path) -> float:
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"{path}, line {line}: column {column!r} holds {text!r}, not a number; "
            "write plain numbers such as 7.0e10"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{path}, line {line}: column {column!r} is {text!r}; N, D, C and loss must be "
            "positive and finite (the fits take their logarithms)"
        )
    return value


def read_points(path: str | Path, params: str = "active_params") -> list[dict]:
    """Rows ``{name, <params>, tokens, flops, val_loss}`` from a CSV of published points."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no CSV file at {path}: give a file with columns N, D (or C), loss")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        found = {key: _column(header, key) for key in COLUMNS}
        missing = [" or ".join(COLUMNS[key]) for key in ("n", "loss") if found[key] is None]
        if found["d"] is None and found["c"] is None:
            missing.append("d or tokens (or c, flops, compute: then D = C / (6 N))")
        if missing:
            raise ConfigError(
                f"{path}: missing column(s) {'; '.join(missing)} (case-insensitive); "
                f"the header has {header}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            if not any((v or "").strip() for v in row.values()):
                continue  # a blank line
            n = _number(row, found["n"], line, path)
            d = _number(row, found["d"], line, path) if found["d"] else None
            c = _number(row, found["c"], line, path) if found["c"] else None
            d = d if d is not None else c / (6 * n)
            rows.append(
                {
                    "name": f"line {line}",
                    params: n,
                    "tokens": d,
                    "flops": c if c is not None else 6 * n * d,
                    "val_loss": _number(row, found["loss"], line, path),
                }
            )
    if len(rows) < MIN_POINTS:
        raise ConfigError(
            f"{path}: {len(rows)} point(s); the parametric fit L = E + A/N^alpha + B/D^beta has "
            f"five unknowns and needs at least {MIN_POINTS} points (more for useful CIs)"
        )
    return rows


def write_points(path: str | Path, n, d, loss) -> Path:
    """A CSV with columns N, D, loss (5 significant digits), the format `read_points` takes."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["N", "D", "loss"])
        for row in zip(n, d, loss, strict=True):
            writer.writerow([f"{float(v):.5g}" for v in row])
    return path
