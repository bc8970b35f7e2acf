"""Run accounting: what the job runs on, how many chips that is, and their peak FLOP/s.

One answer per question, for the trainer, the ledger, the power meter and the forecasts:

- ``HARDWARE``: per-chip dense bf16 peak, HBM, power and an indicative price, keyed by the
  exact ``device_kind`` strings JAX reports (no substring matching: "NVIDIA L40" is not an
  "L4", an "NVIDIA H100 PCIe" is not an SXM H100), plus human names for ``--hardware``.
- ``chips``: accelerators count per chip (a TPU v3 chip shows up as two JAX devices); a CPU
  host counts as one per process, whatever number of XLA devices it is split into.
- ``peak_flops``: the configured peak, else the table's, else on CPU a matmul ceiling measured
  once per machine and cached; an unknown accelerator gets a warning and no figure (no MFU),
  never a made-up one.

Prices are indicative on-demand cloud rates per chip-hour (USD, 2025) for planning only: set
``energy.price_per_device_hour`` (or ``--price``) to yours. A CPU host's power is estimated per
hardware thread (vCPU) as the package TDP share of a current server Xeon (350 W over 112 threads
is 3.1 W) plus memory and uncore, rounded to 5 W.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from research.config import ConfigError

GB = 1e9  # NVIDIA data sheets state memory in GB
GIB = 2**30  # Google's TPU pages state HBM in GiB


@dataclass(frozen=True)
class Hardware:
    name: str  # the human name `--hardware` and `energy.hardware` take
    peak_flops: float  # dense bf16 FLOP/s per chip, no sparsity (0: measured, as on a CPU)
    hbm_bytes: float  # accelerator memory per chip
    tdp_w: float  # power limit per chip (CPU: per hardware thread)
    price_per_hour: float  # indicative USD per chip-hour (CPU: per hardware thread)
    device_kinds: tuple[str, ...] = ()  # exact `jax.Device.device_kind` strings
    aliases: tuple[str, ...] = ()  # other names `lookup` accepts
    power_published: bool = True  # False: tdp_w is our estimate, not a vendor figure


# NVIDIA: dense (non-sparse) tensor-core figures from the data sheets, which print the sparse
# figure (2x) first: H100/H200 https://www.nvidia.com/en-us/data-center/h100/ and /h200/,
# A100 https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
# nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf, L40S/L40/L4/A10 their product data
# sheets. V100 and T4 have no bf16 tensor cores: their fp16 tensor figure is given.
# device_kind is the CUDA device name, as nvidia-smi prints it.
#
# TPU: per-chip peak bf16 and HBM from Google Cloud's TPU system architecture page
# (https://cloud.google.com/tpu/docs/system-architecture-tpu-vm) and the per-version pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). device_kind as JAX reports it: v5e is
# "TPU v5 lite", v5p is "TPU v5", v6e is "TPU v6 lite" (the spelled-out names are accepted too).
# Power: v4 192 W maximum per chip (Google's v4 page; Jouppi et al., "TPU v4", ISCA 2023), v3
# 262 W maximum as we read that paper's v3/v4 table (not re-checked against the PDF here).
# Google publishes no per-chip power for v5e, v5p or v6e:
# those are ESTIMATES (power_published=False): v5e and v5p at v4's 192 W per 275 TFLOP/s scaled
# to their peaks; v6e from v5e's and Google's "67% more energy-efficient than v5e" for Trillium.
# Prices: Google Cloud TPU on-demand list prices per chip-hour (cloud.google.com/tpu/pricing,
# us-central regions, 2025; v3 is $8.00 an hour for a 4-chip v3-8).
_TABLE = [
    Hardware("H100", 989e12, 80 * GB, 700, 3.00, ("NVIDIA H100 80GB HBM3",), ("H100 SXM",)),
    Hardware("H100 PCIe", 756e12, 80 * GB, 350, 2.50, ("NVIDIA H100 PCIe",)),
    Hardware("H100 NVL", 835e12, 94 * GB, 400, 2.80, ("NVIDIA H100 NVL",)),
    Hardware("H200", 989e12, 141 * GB, 700, 3.50, ("NVIDIA H200",), ("H200 SXM",)),
    Hardware("H200 NVL", 835e12, 141 * GB, 600, 3.30, ("NVIDIA H200 NVL",)),
    Hardware("A100", 312e12, 80 * GB, 400, 1.80, ("NVIDIA A100-SXM4-80GB",), ("A100 SXM",)),
    Hardware("A100 40GB", 312e12, 40 * GB, 400, 1.50, ("NVIDIA A100-SXM4-40GB",)),
    Hardware("A100 PCIe", 312e12, 80 * GB, 300, 1.80, ("NVIDIA A100 80GB PCIe",)),
    Hardware("A100 PCIe 40GB", 312e12, 40 * GB, 250, 1.50, ("NVIDIA A100-PCIE-40GB",)),
    Hardware("L40S", 362e12, 48 * GB, 350, 1.20, ("NVIDIA L40S",)),
    Hardware("L40", 181e12, 48 * GB, 300, 1.00, ("NVIDIA L40",)),
    Hardware("L4", 121e12, 24 * GB, 72, 0.70, ("NVIDIA L4",)),
    Hardware("A10", 125e12, 24 * GB, 150, 1.00, ("NVIDIA A10",)),
    Hardware("V100", 125e12, 16 * GB, 300, 2.50, ("Tesla V100-SXM2-16GB",), ("V100 SXM2",)),
    Hardware("V100 32GB", 125e12, 32 * GB, 300, 2.50, ("Tesla V100-SXM2-32GB",)),
    Hardware("V100 PCIe", 112e12, 16 * GB, 250, 2.50, ("Tesla V100-PCIE-16GB",)),
    Hardware("V100 PCIe 32GB", 112e12, 32 * GB, 250, 2.50, ("Tesla V100-PCIE-32GB",)),
    Hardware("T4", 65e12, 16 * GB, 70, 0.35, ("Tesla T4",)),
    Hardware("TPU v3", 123e12, 32 * GIB, 262, 2.00, ("TPU v3",), ("v3",)),
    Hardware("TPU v4", 275e12, 32 * GIB, 192, 3.22, ("TPU v4",), ("v4",)),
    Hardware("TPU v5e", 197e12, 16 * GIB, 138, 1.20, ("TPU v5 lite", "TPU v5e"), ("v5e",), False),
    Hardware("TPU v5p", 459e12, 95 * GIB, 320, 4.20, ("TPU v5", "TPU v5p"), ("v5p",), False),
    Hardware(
        "TPU v6e",
        918e12,
        32 * GIB,
        385,
        2.70,
        ("TPU v6 lite", "TPU v6e"),
        ("v6e", "Trillium"),
        False,
    ),
    Hardware("CPU", 0.0, 0.0, 5.0, 0.05),  # per hardware thread; the peak is measured
]
HARDWARE: dict[str, Hardware] = {h.name: h for h in _TABLE}
BY_DEVICE_KIND: dict[str, Hardware] = {kind: h for h in _TABLE for kind in h.device_kinds}
CPU = HARDWARE["CPU"]


def cpu_threads() -> int:
    """Hardware threads this process may run on (its share of the host, not the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def lookup(name: str) -> Hardware:
    """A table entry by its name, an alias or an exact device kind (case-insensitive)."""
    key = " ".join(name.split()).lower()
    if key == "cpu":
        return CPU
    for entry in _TABLE:
        names = (entry.name, *entry.aliases, *entry.device_kinds)
        if key in (n.lower() for n in names):
            return entry
    raise ConfigError(
        f"unknown hardware '{name}'. Known: {', '.join(HARDWARE)}; for other devices pass "
        "their power and peak explicitly (energy.device_power_w / --tdp and --peak-tflops)"
    )


def device_hardware(device_kind: str, platform: str) -> Hardware | None:
    """The table entry for a JAX device (exact device kind), or None where the table has none."""
    if platform == "cpu":
        return CPU
    return BY_DEVICE_KIND.get(device_kind.strip())


def _device_list(devices=None) -> list:
    """jax.devices(), a Mesh's devices, or any iterable of devices, as a flat list."""
    if devices is None:
        import jax

        return list(jax.devices())
    if hasattr(devices, "devices") and hasattr(devices, "axis_names"):  # a jax.sharding.Mesh
        return list(devices.devices.flat)
    if hasattr(devices, "flat"):  # a numpy array of devices
        return list(devices.flat)
    return list(devices)


def chips(devices=None) -> int:
    """How many chips the job runs on, over all processes (default: every device JAX sees).

    Accelerators count per chip: TPU v2/v3 show each chip's two cores as two JAX devices, told
    apart by ``core_on_chip``. A CPU host counts once per process, whatever number of XLA
    devices it is split into (they share its cores, and its peak is measured for them all).
    """
    devices = _device_list(devices)
    if not devices:
        raise ValueError("chips() of no devices")
    if devices[0].platform == "cpu":
        return len({d.process_index for d in devices})
    return sum(1 for d in devices if getattr(d, "core_on_chip", 0) == 0)


# ---------------------------------------------------------------------------- CPU peak


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def measure_matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 matmul on the default device: the CPU's practical ceiling."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_peak_path() -> Path:
    """Where measured CPU peaks are kept: the research cache ($RESEARCH_CACHE)."""
    from research.data.corpus import cache_root

    return cache_root() / "cpu_peak_flops.json"


def cpu_peak_flops() -> tuple[float, str]:
    """This machine's f32 matmul ceiling, measured the first time and read back afterwards.

    Re-measuring every run made MFU follow the host's load (the same code read 2x apart on a
    busy and an idle machine); one figure per machine keeps runs comparable. The key is the CPU
    model and this process's thread count; delete the file (or set log.peak_flops) to redo it.
    """
    path = cpu_peak_path()
    key = f"{cpu_model()} x{cpu_threads()} threads"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if not (isinstance(entry, dict) and entry.get("peak_flops", 0) > 0):
        import jax

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        entry = {
            "peak_flops": measure_matmul_peak(),
            "method": "best of 10 jitted 1024x1024 float32 matmuls",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average": load,
            "jax": jax.__version__,
        }
        if load > cpu_threads():
            warnings.warn(
                f"measured this CPU's peak ({entry['peak_flops'] / 1e9:.0f} GFLOP/s) while the "
                f"host was busy (load average {load:.1f} on {cpu_threads()} threads): it is "
                f"cached in {path} and MFU will read high. Delete that entry and re-run on an "
                "idle machine, or set --set log.peak_flops=<FLOP/s>",
                RuntimeWarning,
                stacklevel=2,
            )
        table[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps(table, indent=2))
        scratch.replace(path)  # atomic: processes measuring at once never see half a file
    return float(entry["peak_flops"]), f"cpu-measured-cached:{path}"


# ---------------------------------------------------------------------------- peak


def peak_flops(configured: float = 0.0, devices=None) -> tuple[float | None, str]:
    """Peak FLOP/s of one chip and where it came from: "config", "table:<device kind>",
    "cpu-measured-cached:<path>", or (None, "unknown:<device kind>") with a warning."""
    if configured < 0 or not math.isfinite(configured):
        raise ConfigError(f"log.peak_flops={configured} must be a positive FLOP/s or 0 (look up)")
    if configured:
        return float(configured), "config"
    device = _device_list(devices)[0]
    if device.platform == "cpu":
        return cpu_peak_flops()
    kind = device.device_kind
    entry = device_hardware(kind, device.platform)
    if entry is None or not entry.peak_flops:
        warnings.warn(
            f"no peak FLOP/s known for device kind '{kind}', so MFU is not reported. Set this "
            "chip's dense bf16 peak with --set log.peak_flops=<FLOP/s per chip>, e.g. "
            "--set log.peak_flops=989e12 for an H100 SXM",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, f"unknown:{kind}"
    return entry.peak_flops, f"table:{kind}"


@dataclass(frozen=True)
class Peak:
    """The whole job's peak: per-chip figure x chips, with its source, for MFU and the ledger."""

    per_chip: float | None
    chips: int
    source: str

    @property
    def total(self) -> float | None:
        return None if self.per_chip is None else self.per_chip * self.chips

    def mfu(self, flops: float, seconds: float) -> float:
        """Model FLOPs utilisation; NaN where the peak is unknown (rather than a made-up one)."""
        if self.total is None or seconds <= 0:
            return math.nan
        return flops / seconds / self.total

    def describe(self) -> str:
        if self.total is None:
            return f"peak FLOP/s unknown ({self.source}): MFU not reported; set log.peak_flops"
        return (
            f"peak {self.total:.4g} FLOP/s = {self.chips} chip(s) x {self.per_chip:.4g} "
            f"from {self.source}"
        )

    def to_dict(self) -> dict:
        return {
            "peak_flops": self.total,
            "peak_flops_per_chip": self.per_chip,
            "peak_flops_source": self.source,
        }


def job_peak(configured: float = 0.0, devices=None) -> Peak:
    """``peak_flops`` for the devices' chip, times ``chips`` of them."""
    per_chip, source = peak_flops(configured, devices)
    return Peak(per_chip, chips(devices), source)
