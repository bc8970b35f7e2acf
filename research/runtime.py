"""Process-wide JAX set-up that must happen before backends start: CPU devices, compile cache."""

from __future__ import annotations

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


def setup() -> None:
    configure_cpu_devices()
    enable_compilation_cache()
