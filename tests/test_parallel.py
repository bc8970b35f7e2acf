"""Parallel layouts on 8 fake CPU devices: every mesh trains like one device, and really shards."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_metrics
from flax import nnx

from research.config import ConfigError, MeshConfig, ModelConfig, load_experiment
from research.models import Transformer
from research.models.stack import stack_layers, unstack_layers
from research.parallel.mesh import MeshShapeError, make_mesh
from research.run import resolve_config, train
from research.train.state import init_train_state

# vocab 128: the character vocabulary (65) does not split over tensor-parallel devices; 4 KV
# heads split 4 ways. Checkpoints at steps 3 and 4: the restore test resumes from step 3.
COMMON = (
    "log.progress=false",
    "log.tensorboard=false",
    "model.vocab_size=128",
    "model.n_kv_heads=4",
    "train.steps=4",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.sample_tokens=0",
    "train.eval_batches=1",
)
STEPS = (1, 2, 3, 4)
MOE = ("model.n_experts=4", "model.top_k=2", "model.moe_every=2")


def run(tmp_path_factory, *overrides):
    cfg = load_experiment("tiny", [*COMMON, *overrides])
    cfg.train.run_dir = str(tmp_path_factory.mktemp("run"))
    return resolve_config(cfg)[0], train(cfg)  # train never changes the caller's config


def losses(result) -> list[float]:
    metrics = read_metrics(result.run_dir)
    return [metrics[step]["train/loss"] for step in STEPS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each layout trained once per module: (config, result), shared by the tests below."""
    cache = {}

    def get(layout: str):
        if layout not in cache:
            cache[layout] = run(tmp_path_factory, *LAYOUTS[layout])
        return cache[layout]

    return get


@pytest.fixture
def single_device(runs):
    return lambda moe: losses(runs("single_moe" if moe else "single")[1])


LAYOUTS = {
    "single": ("mesh.data=1",),
    "single_moe": ("mesh.data=1", *MOE),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "tp2_dp4_scan_remat": (
        "mesh.data=4",
        "mesh.tensor=2",
        "model.scan_layers=true",
        "model.remat=full",
    ),
    "fsdp2_tp2_dp2_savedots": (
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "model.remat=save-dots",
    ),
    "moe_ep2_tp2_fsdp2_scan": (
        *MOE,
        "mesh.data=1",
        "mesh.expert=2",
        "mesh.tensor=2",
        "mesh.fsdp=2",
        "model.scan_layers=true",
    ),
}

# (parameter path, the mesh axes its shards must be split over) per layout
SHARDED = {
    "fsdp8": [(("embed",), {"fsdp"}), (("blocks", 0, "attn", "wq"), {"fsdp"})],
    "tp2_dp4_scan_remat": [  # scan keeps the blocks stacked: a leading, unsharded layer axis
        (("stacked_blocks", 0, "attn", "wq"), {"tensor"}),
        (("stacked_blocks", 0, "mlp", "w_down"), {"tensor"}),
    ],
    "fsdp2_tp2_dp2_savedots": [
        (("blocks", 0, "mlp", "w_gate"), {"fsdp", "tensor"}),
        (("embed",), {"fsdp", "tensor"}),
    ],
    "moe_ep2_tp2_fsdp2_scan": [
        (("stacked_blocks", 1, "mlp", "w_up"), {"expert", "fsdp", "tensor"})
    ],
}


@pytest.mark.parametrize(
    "layout",
    [
        # data=8 alone: tests/test_train.py::test_sharded_run_matches_single_device
        "fsdp8",
        pytest.param("tp2_dp4_scan_remat", marks=pytest.mark.slow),
        pytest.param("fsdp2_tp2_dp2_savedots", marks=pytest.mark.slow),
        # Expert parallelism alone is tested in test_moe.py; this combination costs two runs.
        pytest.param("moe_ep2_tp2_fsdp2_scan", marks=pytest.mark.slow),
    ],
)
def test_layout_trains_like_one_device(layout, runs, single_device):
    cfg, result = runs(layout)
    expected = single_device("model.n_experts=4" in LAYOUTS[layout])
    np.testing.assert_allclose(losses(result), expected, rtol=2e-5)

    mesh = make_mesh(cfg.mesh, batch_size=cfg.train.batch_size)
    _, state, _, _ = init_train_state(cfg, mesh)
    for path, axes in SHARDED[layout]:
        leaf = state["params"]
        for key in path:
            leaf = leaf[key]
        spec_axes = {a for entry in leaf.sharding.spec if entry for a in np.atleast_1d(entry)}
        if path[0] == "stacked_blocks":
            assert leaf.shape[0] == cfg.model.n_layers // len(state["params"]["stacked_blocks"])
            assert leaf.sharding.spec[0] is None  # each device holds every layer's slice
        assert spec_axes == axes, (path, leaf.sharding.spec)
        ways = int(np.prod([mesh.shape[a] for a in axes]))
        assert leaf.addressable_shards[0].data.size * ways == leaf.size
    memory = json.loads((result.run_dir / "memory.json").read_text())
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    if layout == "fsdp8":  # every tiny parameter has an embed dim: exactly 1/8 per device
        assert memory["params_bytes"] * 8 == param_bytes
    assert 2 * memory["params_bytes"] <= memory["optimizer_bytes"]  # Adam's two moments
    assert memory["optimizer_bytes"] <= 2 * memory["params_bytes"] + 1024

    # Every matrix splits (each has embed or a tensor axis), the optimizer moments too; a stacked
    # norm scale [layers, embed] is a vector per layer, replicated unless fsdp splits embed.
    def layer_ndim(path, x) -> int:
        return x.ndim - any(getattr(key, "key", None) == "stacked_blocks" for key in path)

    leaves = jax.tree_util.tree_leaves_with_path(state)
    matrices = [x for path, x in leaves if layer_ndim(path, x) >= 2]
    assert matrices and not any(x.sharding.is_fully_replicated for x in matrices)


def tiny(**overrides) -> ModelConfig:
    settings = dict(vocab_size=40, d_model=32, n_layers=4, n_heads=4, seq_len=16) | overrides
    return ModelConfig(**settings).resolved()


def loss_and_grads(cfg: ModelConfig, params=None):
    """Loss and gradients (both in the unrolled layout) at ``params`` (unrolled layout, a pure
    dict) or at the model's own initial parameters."""
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = nnx.to_pure_dict(state)
    if params is not None:
        converted = stack_layers(params, cfg) if cfg.scan_layers else params
        assert jax.tree.structure(converted) == jax.tree.structure(state)
        state = converted
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, cfg.vocab_size)

    def loss(state):
        logits, _, aux = nnx.merge(graphdef, state).forward(
            tokens[:, :-1], dropout_key=jax.random.key(2) if cfg.dropout else None
        )
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
        return ce + (aux["load_balance_loss"] if aux else 0.0)

    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    if cfg.scan_layers:
        state, grads = unstack_layers(state), unstack_layers(grads)
    return value, grads, state


@pytest.mark.parametrize(
    ("base", "variants"),
    [
        (
            dict(dropout=0.1, n_layers=2),  # dropout keys follow the layer index in the scan
            [dict(scan_layers=True), dict(remat="full"), dict(remat="save-dots", scan_layers=True)],
        ),
        (dict(n_experts=4, top_k=2, moe_every=2), [dict(scan_layers=True, remat="full")]),
    ],
    ids=["dense", "moe"],
)
def test_scan_and_remat_compute_the_same_loss_and_gradients(base, variants):
    reference, ref_grads, state = loss_and_grads(tiny(**base))
    for switches in variants:
        value, grads, _ = loss_and_grads(tiny(**base, **switches), state)
        np.testing.assert_allclose(value, reference, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("moe", [{}, dict(n_experts=4, top_k=2, moe_every=2)], ids=["dense", "moe"])
def test_scanned_model_starts_from_the_unrolled_models_parameters(moe):
    """Same seed, same values, only stacked: scan_layers changes the layout, not the run."""
    plain = nnx.to_pure_dict(nnx.state(Transformer(tiny(**moe), nnx.Rngs(0))))
    scanned = nnx.to_pure_dict(nnx.state(Transformer(tiny(**moe, scan_layers=True), nnx.Rngs(0))))
    assert "blocks" not in scanned
    assert scanned["stacked_blocks"][0]["attn"]["wq"].shape[0] == 4 // (2 if moe else 1)
    stacked = stack_layers(plain, tiny(**moe))
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(scanned), strict=True):
        np.testing.assert_array_equal(a, b)
    roundtrip = unstack_layers(scanned)
    for a, b in zip(jax.tree.leaves(roundtrip), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def test_scan_needs_whole_moe_groups():
    with pytest.raises(ConfigError, match="moe_every=2"):
        tiny(n_layers=3, n_experts=4, moe_every=2, scan_layers=True)


def test_unknown_remat_policy_is_rejected():
    with pytest.raises(ConfigError, match="none, full or save-dots"):
        tiny(remat="some")


@pytest.mark.parametrize(
    ("mesh", "match"),
    [
        (MeshConfig(data=3), "needs 3 devices, which does not divide the 8"),
        (MeshConfig(data=-1, fsdp=-1), "only one mesh axis may be -1"),
        (MeshConfig(data=-1, tensor=3), "need a multiple of 3 devices, but there are 8"),
    ],
)
def test_bad_mesh_shapes_name_the_mesh_and_the_devices(mesh, match):
    with pytest.raises(MeshShapeError, match=match):
        make_mesh(mesh)


def test_cli_reports_a_bad_mesh_as_a_usage_error(capsys):
    from research.cli import main as cli_main

    assert cli_main(["info", "tiny", "--set", "mesh.fsdp=-1"]) == 2  # data is -1 by default
    assert "mesh.data=1 --set mesh.fsdp=-1" in capsys.readouterr().err


def test_model_dims_that_do_not_split_name_the_dim_and_the_mesh():
    from research.train.state import build_model

    with pytest.raises(MeshShapeError, match=r"kv' of size 2 .*tensor.* size 4"):
        build_model(tiny(n_kv_heads=2), 0, make_mesh(MeshConfig(data=2, tensor=4)))


def test_two_processes_train_like_one(single_device, tmp_path):
    """Two real processes on localhost (2 CPU devices each) joined by jax.distributed, each
    reading its own half of every batch, through the CLI; process 0 alone writes the logs."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "research.cli", "train", "tiny"]
    # sample_tokens: sampling gathers the sharded params from both processes first.
    for item in (*COMMON, "mesh.data=-1", "train.sample_tokens=8", f"train.run_dir={run_dir}"):
        command += ["--set", item]
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "RESEARCH_COORDINATOR": f"127.0.0.1:{port}",
            "RESEARCH_NUM_PROCESSES": "2",
            "RESEARCH_PROCESS_ID": str(index),
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        }
        log = open(tmp_path / f"process{index}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
    try:
        codes = [proc.wait(timeout=240) for proc, _ in procs]
    finally:
        for proc, log in procs:
            proc.kill()
            log.close()
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert "'data': 4" in logs[0]  # one mesh over both processes' devices
    assert "--- sample ---" in logs[0] and "--- sample ---" not in logs[1]
    metrics = read_metrics(run_dir)
    np.testing.assert_allclose(
        [metrics[step]["train/loss"] for step in STEPS], single_device(False), rtol=2e-5
    )
    assert (run_dir / "checkpoints" / "4").is_dir()  # saved by both processes together


def test_checkpoint_from_fsdp8_restores_under_dp2_tp4(runs, tmp_path):
    """Orbax reshards on restore: the fsdp=8 run's step-3 checkpoint, restored under
    data=2 x tensor=4, holds identical values, and resuming there gives the same step-4 loss."""
    import shutil

    from research.train.checkpoint import Checkpointer
    from research.train.state import abstract_like

    cfg, result = runs("fsdp8")
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "4")  # resume from step 3

    def restored(*mesh):
        cfg = load_experiment("tiny", [*COMMON, *mesh])
        cfg.model = cfg.model.resolved()
        _, state, _, _ = init_train_state(cfg, make_mesh(cfg.mesh))
        checkpointer = Checkpointer(copy / "checkpoints", 3, use_async=False)
        restored = checkpointer.restore_latest(abstract_like(state))
        checkpointer.close()
        assert restored.step == 3
        return restored.state

    tp = ("mesh.data=2", "mesh.tensor=4")
    a, b = restored(*LAYOUTS["fsdp8"]), restored(*tp)
    assert a["params"]["blocks"][0]["attn"]["wq"].sharding.spec[0] == "fsdp"
    assert b["params"]["blocks"][0]["attn"]["wq"].sharding.spec[1] == "tensor"
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(jax.device_get(x), jax.device_get(y))

    resumed = load_experiment("tiny", [*COMMON, *tp, f"train.run_dir={copy}"])
    assert train(resumed).steps_run == 1
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    step4 = [row["train/loss"] for row in rows if row["step"] == 4 and "train/loss" in row]
    assert len(step4) == 2  # the fsdp=8 run's, then the resumed dp2 x tp4 run's
    assert step4[1] == pytest.approx(step4[0], rel=1e-5)


@pytest.mark.parametrize("remat", ["none", "save-dots", "full"])
def test_activation_estimate_is_close_to_jax_residuals(remat):
    """The memory report's activation figure against what jax.vjp really keeps."""
    from research.train.memory import activation_bytes, saved_residual_bytes
    from research.train.step import cross_entropy

    cfg = tiny(vocab_size=256, d_model=64, n_heads=4, seq_len=64, remat=remat)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    tokens = jnp.zeros((3, cfg.seq_len), jnp.int32)  # batch 3: no weight has a dim of 3

    def loss(p):
        return cross_entropy(nnx.merge(graphdef, p)(tokens), tokens)[0]

    reference = saved_residual_bytes(loss, params, batch=3)
    estimate = activation_bytes(cfg, tokens.size, tensor=1)
    assert 0.7 < estimate / reference < 1.3, (estimate, reference)
