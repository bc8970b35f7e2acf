"""Load a trained run (config, data, parameters) from its run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from research.config import ExperimentConfig, MeshConfig
from research.data.shards import PreparedData, prepare
from research.parallel.mesh import make_mesh
from research.parallel.shardings import abstract_params, param_shardings
from research.train.checkpoint import Checkpointer


@dataclass
class LoadedRun:
    config: ExperimentConfig
    data: PreparedData
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: dict
    step: int


def load_run(run_dir: Path) -> LoadedRun:
    config_path = Path(run_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (no config.json); train one with `research train`"
        )
    cfg = ExperimentConfig.from_dict(json.loads(config_path.read_text()))
    cfg.mesh = MeshConfig()  # inference uses whatever devices are here, data-parallel
    data = prepare(cfg.data, verbose=False)
    mesh = make_mesh(cfg.mesh)
    cfg.model = cfg.model.resolved(vocab_size=data.vocab_size)
    graphdef, _ = param_shardings(cfg.model, mesh)
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", read_only=True)
    restored = checkpointer.restore_latest(
        {"params": abstract_params(cfg.model, mesh)}, params_only=True
    )
    checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"{run_dir} has no readable checkpoint yet")
    return LoadedRun(cfg, data, mesh, graphdef, restored.state["params"], restored.step)
