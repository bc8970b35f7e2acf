"""Process-wide JAX set-up that must happen before backends start: CPU devices, compile cache."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path


def configure_cpu_devices() -> None:
    """Make each CPU core its own XLA device, unless XLA_FLAGS already sets a count.

    XLA's CPU runtime splits one program's small ops poorly over cores; one device per core,
    data-parallel, trains small models faster (measured in benchmarks/train_throughput.py,
    figures in the README). Override the count with RESEARCH_CPU_DEVICES.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    count = int(os.environ.get("RESEARCH_CPU_DEVICES", min(os.cpu_count() or 1, 8)))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk so a re-run (or a resume) skips XLA compilation.

    $RESEARCH_COMPILE_CACHE sets the folder; set it to an empty string to disable.
    """
    import jax

    folder = os.environ.get("RESEARCH_COMPILE_CACHE", "~/.cache/research/xla")
    if not folder:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_once_options(platform: str) -> dict:
    """XLA compiler options for a program that runs once or briefly (parameter init, the
    sample printed after training): on CPU, LLVM's optimisation passes take seconds to compile
    such a program and save less than that when it runs (same results; README, "Training
    recipe"). Other backends compile it as usual."""
    return {"xla_backend_optimization_level": 0} if platform == "cpu" else {}


def has_tpu_chips() -> bool:
    """Whether this machine has TPU chips: Google's PCI vendor id, as JAX itself checks."""
    for vendor in Path("/sys/bus/pci/devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return False


def skip_absent_tpu() -> None:
    """Leave the TPU out of the platforms JAX starts when libtpu is installed (``research
    compile`` and its tests use it for compile-only devices) but the machine has no TPU chips:
    otherwise every JAX program probes for them and prints errors. JAX_PLATFORMS, if set,
    wins; compile-only TPU devices work either way."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if has_tpu_chips():
        return
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    gpu = [p for p in ("cuda", "rocm") if any(n.startswith(f"jax-{p}") for n in installed)]
    os.environ["JAX_PLATFORMS"] = ",".join([*gpu, "cpu"])  # a GPU absent is skipped quietly


def setup() -> None:
    skip_absent_tpu()
    configure_cpu_devices()
    enable_compilation_cache()
