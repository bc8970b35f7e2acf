"""Accelerator data for estimates: dense peak FLOP/s, board power (TDP) and an indicative price.

Peaks are the vendors' dense bf16/fp16 tensor figures (train/metrics.py's table); TDPs are the
SXM/board limits from the data sheets. Prices are indicative on-demand cloud rates per device-hour
(USD, 2025) for planning only: set ``energy.price_per_device_hour`` (or ``--price``) to yours.

A CPU host has no useful data-sheet figure for one process: its power is estimated per hardware
thread (vCPU) as the package TDP share of a current server Xeon (350 W over 112 threads is 3.1 W)
plus memory and uncore, rounded to 5 W; its peak is measured (the f32 matmul ceiling).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from research.config import ConfigError
from research.train.metrics import PEAK_FLOPS_BF16


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device (0: measure it, as on a CPU)
    tdp_w: float  # board power limit per device
    price_per_hour: float  # indicative USD per device-hour


# Longest names first so "A100" does not shadow "A100-80GB" when matching a device kind.
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in [
        Hardware("H200", PEAK_FLOPS_BF16["H200"], 700.0, 3.50),
        Hardware("H100", PEAK_FLOPS_BF16["H100"], 700.0, 3.00),
        Hardware("A100", PEAK_FLOPS_BF16["A100"], 400.0, 1.80),
        Hardware("L40S", PEAK_FLOPS_BF16["L40S"], 350.0, 1.20),
        Hardware("L4", PEAK_FLOPS_BF16["L4"], 72.0, 0.70),
        Hardware("A10", PEAK_FLOPS_BF16["A10"], 150.0, 1.00),
        Hardware("V100", PEAK_FLOPS_BF16["V100"], 300.0, 2.50),
        Hardware("CPU", 0.0, 5.0, 0.05),  # per vCPU: power and price scale with the thread count
    ]
}


def cpu_threads() -> int:
    """Hardware threads this process may run on (its share of the host, not the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def lookup(name: str) -> Hardware:
    """A table entry by name (case-insensitive), or by a device kind that contains the name."""
    key = name.strip().lower()
    if key == "cpu" or key.startswith("cpu"):
        return HARDWARE["CPU"]
    for entry in HARDWARE.values():
        if entry.name.lower() == key:
            return entry
    for entry in sorted(HARDWARE.values(), key=lambda h: -len(h.name)):
        if entry.name.lower() in key:
            return entry
    raise ConfigError(
        f"unknown hardware '{name}'. Known: {', '.join(HARDWARE)}; for other devices pass "
        "their power and peak explicitly (energy.device_power_w / --tdp and --peak-tflops)"
    )


def device_hardware(device_kind: str, platform: str) -> Hardware | None:
    """The table entry for a JAX device, or None where the table has no figures for it."""
    if platform == "cpu":
        return HARDWARE["CPU"]
    try:
        return lookup(device_kind)
    except ConfigError:
        return None
