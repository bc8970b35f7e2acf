"""The run ledger: tokens, FLOPs, chip-hours, kWh, kg CO2eq and dollars of a run or a sweep.

``record_work`` adds a stretch of training's tokens, FLOPs and seconds to ``ledger.json``, with
the chips and the peak FLOP/s the run's MFU is measured against; ``record_energy`` adds the
energy reading of the same stretch (a resumed run keeps adding) and recomputes the derived
figures:

    device_hours = device_seconds / 3600
    energy_kwh   = device energy (J) / 3.6e6 x PUE                 (facility energy)
    co2_kg       = energy_kwh x grid intensity (kg CO2eq / kWh)
    cost_usd     = device_hours x price per device-hour

A checkpoint interval is written in two moves so that a kill at any point counts each step the
restored state holds exactly once: ``record_pending`` stores the interval (its tokens, FLOPs and
energy reading) under ``pending`` before orbax starts the save, and ``commit_pending`` adds it to
the totals once the save is durable, or when a resumed run restores that very checkpoint (the
process was killed after orbax finalised it but before the trainer saw it durable). A pending
interval whose checkpoint never became durable is dropped: its steps are trained again and
counted then. A resume from a checkpoint older than the ledger's last counted one (the newer
one was set aside as corrupt) moves the later steps' tokens and FLOPs to ``redone_*``
(``rewind``), so that ``tokens`` and ``flops`` count each step of the state once. Every write
replaces ``ledger.json`` whole (``write_text_atomic``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from research.config import EnergyConfig
from research.storage import run_path, write_text_atomic
from research.train.accounting import CPU, Peak, chips, cpu_threads, lookup
from research.train.power import EnergyReading

JOULES_PER_KWH = 3.6e6

# Additive fields: a sweep's ledger is their sum over runs.
SUMMED = (
    "tokens",
    "flops",
    "wall_seconds",
    "device_seconds",
    "device_hours",
    "energy_device_joules",
    "energy_kwh",
    "co2_kg",
    "cost_usd",
)


def price_per_device_hour(cfg: EnergyConfig, hardware: str) -> float | None:
    if cfg.price_per_device_hour:
        return cfg.price_per_device_hour
    try:
        entry = lookup(hardware)
    except ValueError:
        return None
    if entry is CPU:
        return entry.price_per_hour * cpu_threads()
    return entry.price_per_hour


def record_work(
    run_dir: Path | str, tokens: int, flops: float, seconds: float, mesh, peak: Peak
) -> dict:
    """Add a stretch of training's tokens, FLOPs and time to ledger.json (process 0 writes).

    device_seconds is seconds x ``chips(mesh)``: a CPU host counts once per process, whatever
    number of XLA devices it was split into; the peak recorded is the one MFU is divided by.
    """
    if jax.process_index() != 0:  # one writer; the others' time is the same wall time
        return {"wall_seconds": seconds}
    ledger = _add_work(_read(run_dir), tokens, flops, seconds, mesh, peak)
    _write(run_dir, ledger)
    return ledger


def _read(run_dir: Path | str) -> dict:
    path = run_path(run_dir) / "ledger.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write(run_dir: Path | str, ledger: dict) -> None:
    # Whole or not at all: a kill mid-write must not leave half a ledger behind.
    write_text_atomic(run_path(run_dir) / "ledger.json", json.dumps(ledger, indent=2))


def _add_work(ledger: dict, tokens: int, flops: float, seconds: float, mesh, peak: Peak) -> dict:
    count = chips(mesh)
    ledger["tokens"] = ledger.get("tokens", 0) + tokens
    ledger["flops"] = ledger.get("flops", 0.0) + flops
    ledger["wall_seconds"] = ledger.get("wall_seconds", 0.0) + seconds
    ledger["device_seconds"] = ledger.get("device_seconds", 0.0) + seconds * count
    ledger["device_kind"] = mesh.devices.flat[0].device_kind
    ledger["device_count"] = count
    ledger.update(peak.to_dict())
    return ledger


def derive(ledger: dict, cfg: EnergyConfig) -> dict:
    """Fill device_hours, energy_kwh, co2_kg and cost_usd from the raw fields and the config."""
    out = dict(ledger)
    out["device_hours"] = out.get("device_seconds", 0.0) / 3600
    joules = out.get("energy_device_joules")
    out["pue"] = cfg.pue
    out["grid_kg_co2_per_kwh"] = cfg.grid_kg_co2_per_kwh
    if joules is None:
        out["energy_kwh"] = out["co2_kg"] = None
    else:
        out["energy_kwh"] = joules / JOULES_PER_KWH * cfg.pue
        out["co2_kg"] = out["energy_kwh"] * cfg.grid_kg_co2_per_kwh
    price = price_per_device_hour(cfg, out.get("hardware", "unknown"))
    out["price_per_device_hour"] = price
    out["cost_usd"] = None if price is None else out["device_hours"] * price
    return out


def record_energy(run_dir: Path | str, cfg: EnergyConfig, reading: EnergyReading) -> dict:
    """Add this call's energy to run_dir/ledger.json and rewrite the derived figures."""
    ledger = _add_energy(_read(run_dir), cfg, reading)
    _write(run_dir, ledger)
    return ledger


def _add_energy(ledger: dict, cfg: EnergyConfig, reading: EnergyReading) -> dict:
    previous = ledger.get("energy_device_joules", 0.0)
    if reading.joules is None or previous is None:
        ledger["energy_device_joules"] = None
    else:
        ledger["energy_device_joules"] = previous + reading.joules
    methods = set(filter(None, ledger.get("energy_method", "").split("+"))) | {reading.method}
    ledger["energy_method"] = "+".join(sorted(methods))
    ledger["hardware"] = reading.hardware
    ledger["mean_power_w"] = reading.power_w
    return derive(ledger, cfg)


def record_pending(
    run_dir: Path | str, step: int, tokens: int, flops: float, reading: EnergyReading
) -> None:
    """Store the interval that checkpoint ``step`` will hold, before its save starts (process 0
    writes); ``commit_pending`` counts it once the checkpoint is known to be durable."""
    if jax.process_index() != 0:
        return
    ledger = _read(run_dir)
    pending = {"step": step, "tokens": tokens, "flops": flops}
    ledger["pending"] = {**pending, "reading": dataclasses.asdict(reading)}
    _write(run_dir, ledger)


def commit_pending(
    run_dir: Path | str, step: int, cfg: EnergyConfig, mesh, peak: Peak
) -> dict | None:
    """Add the pending interval to the totals if its checkpoint is ``step`` (durable now, or the
    one a resumed run restored), else drop it (its save never completed); one write either way.
    Returns the ledger, or None where there was nothing pending (or not process 0)."""
    if jax.process_index() != 0:
        return None
    ledger = _read(run_dir)
    pending = ledger.pop("pending", None)
    if pending is None:
        return None
    if pending["step"] == step:
        reading = EnergyReading(**pending["reading"])
        tokens, flops = pending["tokens"], pending["flops"]
        ledger = _add_work(ledger, tokens, flops, reading.seconds, mesh, peak)
        ledger = _add_energy(ledger, cfg, reading)
        ledger["step"] = step  # the last checkpoint whose steps are counted
    _write(run_dir, ledger)
    return ledger


def rewind(run_dir: Path | str, step: int, tokens_per_step: int, flops_per_step: float) -> None:
    """A resume from checkpoint ``step`` older than the ledger's last counted one (the newer one
    was corrupt and set aside): its later steps leave ``tokens``/``flops``, which count the steps
    the state holds once, for ``redone_tokens``/``redone_flops``; the time and energy they took
    stay charged, as they were spent. The steps are trained again and counted then."""
    if jax.process_index() != 0:
        return
    ledger = _read(run_dir)
    counted = ledger.get("step")
    if counted is None or counted <= step:
        return
    steps = counted - step
    for field, per_step in (("tokens", tokens_per_step), ("flops", flops_per_step)):
        ledger[field] -= steps * per_step
        ledger[f"redone_{field}"] = ledger.get(f"redone_{field}", 0) + steps * per_step
    ledger["step"] = step
    _write(run_dir, ledger)


def sum_ledgers(ledgers: list[dict]) -> dict:
    """A sweep's totals; a figure missing from any run (no power data) makes the total None."""
    total: dict = {"runs": len(ledgers)}
    for key in SUMMED:
        values = [ledger.get(key) for ledger in ledgers]
        total[key] = None if any(v is None for v in values) else float(sum(values))
    total["energy_method"] = "+".join(
        sorted({m for ledger in ledgers for m in ledger.get("energy_method", "").split("+") if m})
    )
    return total
