"""The backend the code is built for: normally JAX's default backend, but a compile for another
one (``research compile`` builds TPU programs on a CPU machine) names its target here, so the
choices that depend on the backend (compute dtype, attention and MoE implementations, which
flash-attention kernel) are the ones that backend would make, not the host's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import jax

_TARGET: ContextVar[str | None] = ContextVar("research_target_backend", default=None)


def backend() -> str:
    """ "cpu", "gpu" or "tpu": the target set by ``target_backend``, else JAX's default."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target_backend(platform: str) -> Iterator[None]:
    """Build (trace, lower) for ``platform`` instead of the host's backend inside this block."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"target backend must be cpu, gpu or tpu, not {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
