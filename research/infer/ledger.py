"""The inference ledger: tokens, device-seconds and energy of prefill and decode, apart.

Same fields and derivations as training's ``ledger.json`` (research/train/ledger.py: energy
from NVML where there is a meter, else the hardware table's TDP estimate; kWh with the PUE,
CO2 and dollars from the energy config), one entry per phase, plus the energy per 1,000
tokens. Prefill is compute-bound and decode memory-bound, so their cost per token differs by
orders of magnitude and a single figure would say little.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import jax

from research.config import EnergyConfig
from research.train.accounting import chips
from research.train.ledger import derive
from research.train.power import PowerMeter


@dataclass
class PhaseRecord:
    tokens: int = 0


class InferenceLedger:
    """``with ledger.phase("decode") as r: ...; r.tokens = n`` adds one stretch of work."""

    def __init__(self, energy: EnergyConfig | None = None, path: str | Path | None = None):
        self.energy = energy or EnergyConfig()
        self.path = Path(path) if path else None
        self.phases: dict[str, dict] = {}
        if self.path and self.path.exists():
            self.phases = json.loads(self.path.read_text())

    @contextmanager
    def phase(self, name: str):
        record = PhaseRecord()
        meter = PowerMeter(self.energy)
        start = time.perf_counter()
        try:
            yield record
        finally:
            seconds = time.perf_counter() - start
            reading = meter.stop()
            self._add(name, record.tokens, seconds, reading)

    def _add(self, name: str, tokens: int, seconds: float, reading) -> None:
        entry = dict(self.phases.get(name, {}))
        count = chips(jax.devices())
        entry["tokens"] = entry.get("tokens", 0) + tokens
        entry["wall_seconds"] = entry.get("wall_seconds", 0.0) + seconds
        entry["device_seconds"] = entry.get("device_seconds", 0.0) + seconds * count
        previous = entry.get("energy_device_joules", 0.0)
        entry["energy_device_joules"] = (
            None if reading.joules is None or previous is None else previous + reading.joules
        )
        entry["energy_method"] = reading.method
        entry["hardware"] = reading.hardware
        entry["device_count"] = count
        entry = derive(entry, self.energy)
        per_1k = entry["tokens"] / 1000
        joules = entry["energy_device_joules"]
        entry["joules_per_1k_tokens"] = None if joules is None or not per_1k else joules / per_1k
        entry["tokens_per_second"] = entry["tokens"] / entry["wall_seconds"]
        self.phases[name] = entry
        if self.path:
            self.path.write_text(json.dumps(self.phases, indent=2))
