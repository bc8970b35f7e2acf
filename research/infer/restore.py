"""Load a trained run (config, data, parameters) from its run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from research.config import ExperimentConfig, MeshConfig, RunDirError, load_run_config
from research.data.shards import PreparedData, prepare
from research.parallel.mesh import make_mesh
from research.train.checkpoint import Checkpointer
from research.train.trainer import abstract_like, init_train_state


@dataclass
class LoadedRun:
    config: ExperimentConfig
    data: PreparedData
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: dict
    step: int


def load_run(run_dir: Path) -> LoadedRun:
    cfg = load_run_config(run_dir)  # validated; a missing or broken one is a RunDirError
    cfg.mesh = MeshConfig()  # inference uses whatever devices are here, data-parallel
    data = prepare(cfg.data, verbose=False)
    mesh = make_mesh(cfg.mesh)
    graphdef, state, _, _ = init_train_state(cfg, mesh)
    checkpointer = Checkpointer(
        Path(run_dir) / "checkpoints", cfg.train.keep_checkpoints, use_async=False
    )
    restored = checkpointer.restore_latest(abstract_like(state))
    checkpointer.close()
    if restored is None:
        raise RunDirError(
            f"{run_dir} has no readable checkpoint yet; train it further with `research train` "
            "(a run saves one every train.checkpoint_every steps and at the end)"
        )
    step, state, _ = restored
    return LoadedRun(cfg, data, mesh, graphdef, state["params"], step)
