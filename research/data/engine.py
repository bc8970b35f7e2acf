"""The parts of a streamed prepare run by datatrove, an existing distributed engine.

Why datatrove: it is built for this job (Hugging Face prepared FineWeb with it), it is light
(four small pure-Python dependencies, against Apache Beam's pinned protobuf/grpc/pyarrow stack
or Ray's cluster runtime), and its executors run the same pipeline locally
(``LocalPipelineExecutor``: a process pool on one machine) and on a cluster
(``SlurmPipelineExecutor``: a SLURM job array), with per-task completion markers so a re-run
skips finished tasks. Each datatrove task is one part (``rank`` of ``world_size``) of
``prepare_stream``, whose output depends on (files, settings, part, parts) only: the engine only
schedules, so its output is the same as running the parts one after another.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from research.config import DataConfig
from research.data.corpus import DataError


def _run_part(data_json: str, data, rank: int = 0, world_size: int = 1):
    from research.data.stream import prepare_stream

    prepare_stream(DataConfig(**json.loads(data_json)), rank, world_size, verbose=False)
    yield from data or ()


def prepare_with_datatrove(
    cfg: DataConfig, num_parts: int, parallel: int, logging_dir: str | Path
) -> Path:
    """Run every part of the prepare as a datatrove task, ``parallel`` at a time, on this
    machine; returns the prepared folder. (On SLURM, build a ``SlurmPipelineExecutor`` with
    the same pipeline.)"""
    try:
        from datatrove.executor import LocalPipelineExecutor
    except ImportError:
        raise DataError("--engine datatrove needs datatrove: pip install '.[engine]'") from None
    from research.data.stream import prepared_folder

    step = functools.partial(_run_part, json.dumps(dataclasses.asdict(cfg)))
    executor = LocalPipelineExecutor(
        pipeline=[step],
        tasks=num_parts,
        workers=parallel,
        logging_dir=str(logging_dir),
        start_method="spawn",  # no forked copies of the parent's threads
    )
    executor.run()
    return prepared_folder(cfg, num_parts)[0]
