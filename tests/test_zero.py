"""ZeRO-1 (train.shard_optimizer_update) on 8 fake CPU devices: the sharded update gives the
replicated update's parameters, its optimizer state is really split, and its checkpoints resume."""

import jax
import numpy as np
import pytest
from conftest import read_metrics
from jax.sharding import PartitionSpec

from research.config import ConfigError, load_experiment
from research.parallel.mesh import make_mesh
from research.run import train
from research.run.builder import build_run
from research.run.training import _batches
from research.train.shardings import abstract_params
from research.train.zero import update_shardings

ZERO = "train.shard_optimizer_update=true"
SMALL = ("model.seq_len=16", "log.progress=false", "log.tensorboard=false")
MOE = ("model.n_experts=4", "model.top_k=2", "model.moe_every=2")


def _specs(*overrides: str) -> dict:
    cfg = load_experiment("tiny", [*SMALL, *overrides])
    cfg.model = cfg.model.resolved(vocab_size=128)
    mesh = make_mesh(cfg.mesh)
    shardings = update_shardings(abstract_params(cfg.model, mesh), mesh)
    return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree.leaves_with_path(shardings)}


def test_update_sharding_splits_a_batch_axis_else_the_largest():
    # stacked layers and MoE experts are batch axes of Muon: whole matrices per replica
    scan = _specs("mesh.data=2", "model.scan_layers=true")
    assert scan["['stacked_blocks'][0]['attn']['wq']"] == PartitionSpec("data", None, None, None)
    moe = _specs("mesh.data=4", "model.scan_layers=true", *MOE)
    experts = moe["['stacked_blocks'][1]['mlp']['w_up']"]  # [layers=1, experts=4, d, hidden]
    assert tuple(experts)[:2] == (None, "data")
    # unstacked: the largest dividing axis; a dimension already split (tensor) stays as it is
    flat = _specs("mesh.data=4", "mesh.tensor=2")
    assert flat["['blocks'][0]['mlp']['w_up']"] == PartitionSpec("data", "tensor")  # hidden: tensor
    assert flat["['blocks'][0]['attn']['wq']"] == PartitionSpec("data", "tensor", None)
    assert flat["['embed']"] == PartitionSpec("tensor", "data")
    # no dimension of a norm's 36 divides by 8: it keeps its own (replicated) sharding
    odd = _specs("mesh.data=8", "model.d_model=36")
    assert odd["['final_norm']['scale']"] == PartitionSpec(None)


GROUPED = "optim.muon_group_matrices=true"
# The quickstart's layout (unstacked) and the switches it would turn on, against the plain
# replicated update of optax.contrib.muon (+ AdamW on the rest): Muon's matrices batched by
# shape, each batch split over the replicas, AdamW's and the momentum's work split per leaf.
FAST = ("optim.optimizer=muon", "mesh.data=2", "train.steps=4")


def _params_after_steps(tmp_path, name: str, *overrides: str, steps: int = 2):
    cfg = load_experiment("tiny", [*SMALL, f"train.run_dir={tmp_path / name}", *overrides])
    run = build_run(cfg, "train", resume=False)
    batches, state = _batches(run), run.state
    for _ in range(steps):
        state, _ = run.train_step(state, next(batches))
    run.checkpointer.close()
    return state


@pytest.mark.parametrize(
    "overrides, switches",
    [
        (FAST, (ZERO, GROUPED)),
        # Muon on the stacked layers' and the experts' matrices, split along those axes
        pytest.param(
            ("optim.optimizer=muon", "mesh.data=2", "model.scan_layers=true", *MOE),
            (ZERO,),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ("optim.optimizer=adamw", "mesh.data=8", *MOE), (ZERO,), marks=pytest.mark.slow
        ),
        # unstacked matrices, per leaf: split on a contracted axis
        pytest.param(("optim.optimizer=muon", "mesh.data=8"), (ZERO,), marks=pytest.mark.slow),
        # with fsdp too: the groups split over data, their matrices still over fsdp
        pytest.param(
            ("optim.optimizer=muon", "mesh.data=2", "mesh.fsdp=2"),
            (ZERO, GROUPED),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["muon-grouped", "muon-moe-scan", "adamw-moe", "muon-dense", "muon-grouped-fsdp"],
)
def test_sharded_update_equals_the_replicated_one(tmp_path, overrides, switches):
    replicated = _params_after_steps(tmp_path, "replicated", *overrides)
    sharded = _params_after_steps(tmp_path, "sharded", *overrides, *switches)
    pairs = zip(
        jax.tree.leaves_with_path(replicated["params"]),
        jax.tree.leaves(sharded["params"]),
        strict=True,
    )
    for (path, a), b in pairs:
        assert b.sharding == a.sharding, path  # gathered back: replicated for the forward pass
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # every matrix's optimizer moments are split over data (one slice per replica) where a
    # dimension not split otherwise divides; the replicated run's never are
    ways = jax.tree.leaves(sharded["params"])[0].sharding.mesh.shape["data"]

    def splittable(x):
        spec = tuple(x.sharding.spec) + (None,) * x.ndim
        return any(size % ways == 0 and spec[i] in (None, "data") for i, size in enumerate(x.shape))

    moments = [x for x in jax.tree.leaves(sharded["opt_state"]) if x.ndim >= 2]
    assert sum("data" in x.sharding.spec for x in moments) >= len(moments) // 2
    for x in moments:
        assert ("data" in x.sharding.spec) == splittable(x), (x.shape, x.sharding.spec)
        split = [a for entry in x.sharding.spec if entry for a in np.atleast_1d(entry)]
        ways_total = int(np.prod([x.sharding.mesh.shape[a] for a in split]))
        assert x.addressable_shards[0].data.size * ways_total == x.size  # really split
    assert not any("data" in x.sharding.spec for x in jax.tree.leaves(replicated["opt_state"]))


def test_sharded_update_checkpoint_resumes(tiny_config):
    """Killed after step 3 (its checkpoint), resumed: step 4 is the uninterrupted run's."""
    import shutil

    common = (*SMALL[:1], *FAST, ZERO, GROUPED, "train.checkpoint_every=3", "train.log_every=1")
    common += ("train.sample_tokens=0", "train.eval_every=0", "train.eval_batches=1")
    common += ("log.tensorboard=false",)
    result = train(tiny_config(*common))
    uninterrupted = read_metrics(result.run_dir)[4]["train/loss"]
    shutil.rmtree(result.run_dir / "checkpoints" / "4")
    assert train(tiny_config(*common)).steps_run == 1
    assert read_metrics(result.run_dir)[4]["train/loss"] == pytest.approx(uninterrupted, rel=1e-6)


def test_lora_with_a_sharded_update_is_a_clear_error(tiny_config):
    with pytest.raises(ConfigError, match="train.shard_optimizer_update=false"):
        train(tiny_config(ZERO, "post.lora_rank=4"))


def test_memory_report_counts_the_sharded_optimizer_state_per_device():
    """`research info` and the pre-run memory check count each replica's slice of the optimizer
    state, not the whole of it: the same bytes as the state's own shards on a device."""
    from research.train.memory import memory_report
    from research.train.optimizer import make_optimizer
    from research.train.state import abstract_train_state

    cfg = load_experiment("tiny", [*SMALL, "mesh.data=4", "optim.optimizer=muon", ZERO])
    cfg.model = cfg.model.resolved(vocab_size=128)
    mesh = make_mesh(cfg.mesh)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.width_mult)
    whole = memory_report(cfg.model, mesh, tx, 8).optimizer_bytes
    sliced = memory_report(cfg.model, mesh, tx, 8, shard_optimizer_update=True).optimizer_bytes
    state = abstract_train_state(cfg, mesh, tx)["opt_state"]
    held = sum(
        int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(state)
    )
    assert sliced == held
    assert sliced < 0.3 * whole  # 4 replicas: about a quarter, a few odd leaves whole
