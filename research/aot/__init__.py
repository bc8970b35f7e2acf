"""Ahead-of-time compiles for accelerators this machine does not have: TPU slices described by
name (``v5p-128``), compiled by the real TPU compiler from ``libtpu`` (``research compile``);
an H100, compiled by jax's CUDA plugin down to PTX and ptxas (``gpu.py``)."""
