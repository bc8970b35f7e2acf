"""Energy a run draws: measured with NVML where the GPUs report power, otherwise estimated.

NVML (nvidia-ml-py) gives each GPU's board power; a background thread samples it every 100 ms
and integrates (trapezoids) while training runs. Elsewhere (TPU, CPU, or no nvidia-ml-py) the
energy is TDP x utilisation x devices x seconds, and the reading says so in ``method``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import jax

from research.config import EnergyConfig
from research.train.accounting import chips, cpu_threads, device_hardware, lookup


@dataclass(frozen=True)
class EnergyReading:
    joules: float | None  # None: no figure for this device (set energy.device_power_w)
    seconds: float
    method: str  # nvml (nvml-xN-hosts) | tdp-estimate | configured-power | unknown
    power_w: float | None  # mean draw of all devices together
    hardware: str
    devices: int  # chips of all hosts (accounting.chips: a CPU host counts once per process)


def _nvml_handles(devices: list) -> list | None:
    if (
        not devices
        or devices[0].platform != "gpu"
        or "nvidia" not in devices[0].device_kind.lower()
    ):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(d.local_hardware_id) for d in devices]
    except Exception:  # no library, no driver, or no power readings: fall back to the estimate
        return None


class PowerMeter:
    """Start before training, ``stop()`` after: an EnergyReading for the time in between."""

    def __init__(self, cfg: EnergyConfig, interval: float = 0.1):
        self.cfg = cfg
        self.interval = interval
        devices = jax.local_devices()
        platform = devices[0].platform
        # The ledger is written by process 0 for the whole job: count every host's chips.
        self.hosts = jax.process_count()
        self.devices = chips(jax.devices())
        self.hardware = (
            lookup(cfg.hardware)
            if cfg.hardware != "auto"
            else device_hardware(devices[0].device_kind, platform)
        )
        self.hardware_name = self.hardware.name if self.hardware else devices[0].device_kind
        self.cpu = platform == "cpu"
        self._handles = _nvml_handles(devices) if cfg.measure and not cfg.device_power_w else None
        self._joules = 0.0
        self._lock = threading.Lock()  # the sampler adds, take() reads and resets
        self._stop = threading.Event()
        self._thread = None
        self._start = time.perf_counter()
        if self._handles:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _read_watts(self) -> float:
        import pynvml

        return sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1e3

    def _sample(self) -> None:
        last_t, last_w = time.perf_counter(), self._read_watts()
        while not self._stop.wait(self.interval):
            now, watts = time.perf_counter(), self._read_watts()
            with self._lock:
                self._joules += 0.5 * (watts + last_w) * (now - last_t)
            last_t, last_w = now, watts

    def estimated_power_w(self) -> tuple[float | None, str]:
        """Watts for all counted devices together, and how the figure was obtained."""
        if self.cfg.device_power_w:
            return self.cfg.device_power_w * self.devices, "configured-power"
        if self.hardware is None:
            return None, "unknown"
        per_device = self.hardware.tdp_w * self.cfg.utilisation
        if self.cpu:  # the table's CPU figure is per hardware thread
            per_device *= cpu_threads()
        return per_device * self.devices, "tdp-estimate"

    def take(self) -> EnergyReading:
        """The reading since the previous ``take`` (or the start); the meter keeps running, so
        the trainer can add each checkpoint interval to the ledger as it goes."""
        now = time.perf_counter()
        seconds, self._start = now - self._start, now
        if self._thread is not None:
            with self._lock:
                measured, self._joules = self._joules, 0.0
            # This host's GPUs, measured; other hosts' assumed to draw the same.
            joules = measured * self.hosts
            method = "nvml" if self.hosts == 1 else f"nvml-x{self.hosts}-hosts"
            power = joules / seconds if seconds else None
        else:
            power, method = self.estimated_power_w()
            joules = None if power is None else power * seconds
        return EnergyReading(joules, seconds, method, power, self.hardware_name, self.devices)

    def stop(self) -> EnergyReading:
        """End the sampling thread; the reading since the previous ``take``."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.take()
