"""Named Cloud TPU slices (``v5p-128``, ``v6e-256``, ``2xv5e-256``) as compile-only JAX devices.

``jax.experimental.topologies.get_topology_desc`` with ``libtpu`` installed gives devices that
cannot run anything but that ``jit(...).lower(...).compile()`` compiles for with the real TPU
compiler (XLA:TPU and Mosaic), on any machine. Names follow Google Cloud's accelerator types:
v4 and v5p count TensorCores (two per chip, one "megacore" device per chip: v5p-128 is 64
chips), v5e and v6e count chips. The physical shapes are those of Cloud TPU's slice shapes (as
in MaxText's ``accelerator_to_spec_map.py``); other chip counts are refused with the list.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from research.config import ResearchError
from research.train.accounting import Hardware, lookup


class TopologyError(ResearchError):
    """A TPU slice name this tool cannot describe, or no libtpu to compile with."""


@dataclass(frozen=True)
class Generation:
    jax_prefix: str  # the name libtpu's topology strings use
    cores_per_chip_in_name: int  # v4-8 is 4 chips: the name counts TensorCores
    chip_config: str  # "megacore": one JAX device per chip
    hardware: str  # research.train.accounting's name (HBM, peak, power, price)
    shapes: dict[int, str]  # chips -> physical shape


_SHAPES_3D = {
    4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
    256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}  # fmt: skip

GENERATIONS = {
    "v4": Generation("v4", 2, "megacore", "TPU v4", _SHAPES_3D),
    "v5p": Generation("v5", 2, "megacore", "TPU v5p", _SHAPES_3D),
    "v5e": Generation("v5e", 1, "default", "TPU v5e", _SHAPES_2D),
    "v6e": Generation("v6e", 1, "default", "TPU v6e", _SHAPES_2D),
}
_NAME = re.compile(r"^(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)$")


@dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "2xv5p-128"
    generation: str  # v4 | v5p | v5e | v6e
    chips_per_slice: int
    slices: int
    physical: str  # e.g. "v5:4x4x4", libtpu's topology string

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def hardware(self) -> Hardware:
        return lookup(GENERATIONS[self.generation].hardware)

    @property
    def hbm_bytes(self) -> int:
        """HBM of one chip (one JAX device: megacore on v4/v5p)."""
        return int(self.hardware.hbm_bytes)

    def devices(self) -> list:
        """Compile-only devices of the whole topology (all slices), from libtpu."""
        try:
            import libtpu  # noqa: F401  (the compiler; jax finds it by this package)
        except ImportError as error:
            raise TopologyError(
                "compiling for TPU needs libtpu beside jax: pip install 'jax[tpu]' (or the "
                "libtpu release matching your jax; it runs on any Linux x86-64 machine)"
            ) from error
        from jax.experimental import topologies

        from research.runtime import has_tpu_chips

        if not has_tpu_chips():  # compile-only: no chips to guard, so several processes may
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # (pytest -n, a sweep)
        gen = GENERATIONS[self.generation]
        dims = [int(d) for d in self.physical.split(":")[1].split("x")]
        desc = topologies.get_topology_desc(
            topology_name=self.physical,
            platform="tpu",
            chip_config_name=gen.chip_config,
            # hosts of 2x2 chips (4-chip VMs); a 1-chip slice is its own host
            chips_per_host_bounds=(min(2, dims[0]), min(2, dims[1]), 1),
            num_slices=self.slices,
        )
        return list(desc.devices)


def parse_topology(name: str) -> Topology:
    """``v5p-128``, ``v6e-256``, ``2xv5e-256`` (two slices over the data-center network)."""
    match = _NAME.match(name.strip().lower())
    if not match:
        raise TopologyError(
            f"--topology '{name}' is not a TPU slice name; use GENERATION-SIZE as Google Cloud "
            f"names them ({', '.join(GENERATIONS)}: e.g. v5p-128, v6e-256, v4-8), with "
            "NxNAME for N slices (2xv5p-128)"
        )
    slices, generation, size = int(match.group(1) or 1), match.group(2), int(match.group(3))
    gen = GENERATIONS[generation]
    chips, rest = divmod(size, gen.cores_per_chip_in_name)
    if rest or chips not in gen.shapes or slices < 1:
        sizes = ", ".join(f"{generation}-{c * gen.cores_per_chip_in_name}" for c in gen.shapes)
        raise TopologyError(f"--topology '{name}': no such {generation} slice here; known: {sizes}")
    return Topology(name, generation, chips, slices, f"{gen.jax_prefix}:{gen.shapes[chips]}")
