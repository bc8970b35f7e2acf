"""The logging layer: what TensorBoard reads back from a run, run metadata and tree norms."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from research.config import flatten
from research.train.metrics import DESCRIPTIONS, MetricsLogger, describe
from research.train.norms import tree_norms
from research.train.run_info import git_state, metadata_markdown, run_metadata


def _events(logdir):
    """TensorBoard's own reader, every event kept, old-style values migrated the way the
    TensorBoard server migrates them (histograms to [left, right, count] buckets)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    return EventAccumulator(str(logdir), size_guidance={"tensors": 0}).Reload()


def _raw_values(logdir) -> list:
    """Every Summary.Value as written, in order, from the run's event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    values = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            values.extend((event.step, v) for v in event.summary.value)
    return values


def _log_a_run(run_dir, steps: int = 6):
    logger = MetricsLogger(run_dir)
    for step in range(1, steps + 1):
        logger.scalars(step, {"train/loss": 4.0 / step, "perf/mfu": 0.3}, tokens=step * 512)
        if step % 3 == 0:
            logger.scalars(step, {"val/loss": 4.5 / step}, tokens=step * 512)
    logger.close()
    return logger


def test_events_go_into_the_run_directory_itself(tmp_path):
    run_dir = tmp_path / "runs" / "shakespeare_char"
    run_dir.mkdir(parents=True)
    _log_a_run(run_dir)
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert not (run_dir / "tensorboard").exists()

    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "runs")).Runs()
    assert list(runs) == ["shakespeare_char"]  # what `tensorboard --logdir runs` lists


def test_a_run_written_before_keeps_its_tensorboard_folder(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    _log_a_run(tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_scalars_have_twins_stepped_by_tokens(tmp_path):
    from tensorboard.util import tensor_util

    _log_a_run(tmp_path)
    events = _events(tmp_path)
    tags = events.Tags()["tensors"]

    def series(tag):
        return [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)
        ]

    assert series("train/loss/by_tokens") == [
        (s * 512, pytest.approx(4.0 / s)) for s in range(1, 7)
    ]
    assert series("val/loss/by_tokens") == [(s * 512, pytest.approx(4.5 / s)) for s in (3, 6)]
    assert [v for _, v in series("progress/tokens_seen")] == [
        s * 512 for s in (1, 2, 3, 3, 4, 5, 6, 6)
    ]
    assert "train/loss" in tags and "perf/mfu/by_tokens" in tags
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "tokens": 512, "train/loss": 4.0, "perf/mfu": 0.3}


def test_every_known_tag_is_described_once(tmp_path):
    _log_a_run(tmp_path)
    events = _events(tmp_path)
    for tag in ("train/loss", "train/loss/by_tokens", "val/loss", "perf/mfu"):
        base = tag.removesuffix("/by_tokens")
        assert events.SummaryMetadata(tag).summary_description == DESCRIPTIONS[base]
    described = [v.tag for _, v in _raw_values(tmp_path) if v.metadata.summary_description]
    assert len(described) == len(set(described))  # attached on the first write only
    assert describe("norms/params/blocks") == DESCRIPTIONS["norms/params/*"]
    assert describe("made/up") is None


def test_hparams_are_readable_by_the_hparams_plugin(tmp_path):
    from tensorboard.plugins.hparams import api_pb2, metadata

    logger = MetricsLogger(tmp_path)
    config = {"model": {"d_model": 64, "scan_layers": False, "attention": "xla"}, "seed": None}
    logger.hparams(flatten(config), ["val/loss", "train/loss"])
    logger.close()
    events = _events(tmp_path)
    content = events.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss", "train/loss"]
    types = {info.name: info.type for info in experiment.hparam_infos}
    assert types == {
        "model.d_model": api_pb2.DATA_TYPE_FLOAT64,
        "model.scan_layers": api_pb2.DATA_TYPE_BOOL,
        "model.attention": api_pb2.DATA_TYPE_STRING,
        "seed": api_pb2.DATA_TYPE_STRING,
    }
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.group_name == tmp_path.name
    assert start.hparams["model.d_model"].number_value == 64
    assert start.hparams["model.scan_layers"].bool_value is False
    assert start.hparams["seed"].string_value == "None"


def test_run_metadata_as_text(tmp_path):
    info = run_metadata({"data": 2, "fsdp": 1})
    assert info["mesh"] == {"data": 2, "fsdp": 1}
    assert info["versions"]["jax"] == jax.__version__
    assert info["device"]["platform"] == jax.devices()[0].platform
    assert info["command"] == sys.argv
    json.dumps(info)  # goes into config.json as is
    logger = MetricsLogger(tmp_path)
    logger.run_info(info)
    logger.close()
    text = _events(tmp_path).Tensors("run")[0].tensor_proto.string_val[0].decode()
    assert text == metadata_markdown(info)
    assert "| mesh.data | `2` |" in text and f"| versions.jax | `{jax.__version__}` |" in text


def test_git_state_of_a_repository_and_outside_one(tmp_path):
    assert git_state(tmp_path) == {"sha": None, "dirty": None}
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    (repo / "experiment.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert git_state(repo / "experiment.py") == {"sha": sha, "dirty": False}
    (repo / "experiment.py").write_text("x = 2\n")
    assert git_state(repo) == {"sha": sha, "dirty": True}


def test_histogram_buckets_have_equal_width(tmp_path):
    logger = MetricsLogger(tmp_path)
    load = [0.4, 0.1, 0.2, 0.3]
    logger.histogram(1, "moe/load", load)
    logger.close()
    buckets = _events(tmp_path).Tensors("moe/load")[0]
    from tensorboard.util import tensor_util

    buckets = tensor_util.make_ndarray(buckets.tensor_proto)  # [left, right, count] as drawn
    np.testing.assert_allclose(buckets[:, 0], np.arange(4) - 0.5)
    np.testing.assert_allclose(buckets[:, 1], np.arange(4) + 0.5)
    np.testing.assert_allclose(buckets[:, 2], load)


def test_expert_load_writes_a_histogram_per_layer_and_a_heat_map(tmp_path):
    from PIL import Image
    from tensorboard.util import tensor_util

    load = np.random.default_rng(0).dirichlet(np.ones(8), size=3)  # 3 MoE layers x 8 experts
    logger = MetricsLogger(tmp_path)
    logger.expert_load(5, load, layers=[1, 3, 5])
    logger.expert_load(6, load, layers=[1, 3, 5], image=False)  # histograms only
    with pytest.raises(ValueError, match=r"load\[layers, experts\]"):
        logger.expert_load(5, load.mean(0))
    with pytest.raises(ValueError, match="one index per MoE layer"):
        logger.expert_load(5, load, layers=[1, 3])
    logger.close()
    events = _events(tmp_path)
    for row, layer in zip(load, [1, 3, 5], strict=True):
        event, _ = events.Tensors(f"moe/expert_load/layer_{layer}")
        buckets = tensor_util.make_ndarray(event.tensor_proto)
        np.testing.assert_allclose(buckets[:, 2], row, rtol=1e-6)
        np.testing.assert_allclose(buckets[:, 1] - buckets[:, 0], 1.0)
    (event,) = events.Tensors("moe/expert_load_heatmap")
    width, height, png = event.tensor_proto.string_val  # the image plugin's layout
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (int(width), int(height))
    assert image.size[0] > image.size[1]  # 8 experts across, 3 layers down
    colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 20  # a picture, not a blank canvas


def test_custom_scalars_layout_overlays_train_and_val_loss(tmp_path):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    _log_a_run(tmp_path)
    (event,) = _events(tmp_path).Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    loss = charts["train and val loss, by step"]
    for tag in ("train/loss", "val/loss"):
        assert any(re.search(pattern, tag) for pattern in loss), tag
    assert not any(re.search(pattern, "train/loss/by_tokens") for pattern in loss)
    norms = charts["parameter norms"]
    assert all(any(re.search(p, t) for p in norms) for t in ("norms/params", "norms/params/embed"))
    assert not any(re.search(p, "norms/params/by_tokens") for p in norms)
    assert "perf" in [cat.title for cat in layout.category]


def _reference_norm(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


def test_tree_norms_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    params = {
        "embed": rng.normal(size=(16, 8)).astype(np.float32),
        "blocks": [{"w": rng.normal(size=(8, 8)).astype(np.float32)} for _ in range(2)],
        "lm_head": rng.normal(size=(8, 16)).astype(np.float32),
    }
    updates = jax.tree.map(lambda x: 1e-3 * rng.normal(size=x.shape).astype(np.float32), params)
    norms = jax.jit(tree_norms)(params, updates)
    for name, tree in (("params", params), ("updates", updates)):
        assert float(norms[f"norms/{name}"]) == pytest.approx(_reference_norm(tree), rel=1e-5)
        for group in params:
            assert float(norms[f"norms/{name}/{group}"]) == pytest.approx(
                _reference_norm(tree[group]), rel=1e-5
            )
    ratio = _reference_norm(updates) / _reference_norm(params)
    assert float(norms["norms/update_ratio"]) == pytest.approx(ratio, rel=1e-5)
    assert set(tree_norms(params)) == {"norms/params", *(f"norms/params/{g}" for g in params)}


def test_tree_norms_group_an_nnx_state_by_top_level_module():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, scale: float):
            self.w = nnx.Param(np.full((3, 3), scale, np.float32))

    class Model(nnx.Module):  # the transformer's shape of tree: embed, a list of blocks, head
        def __init__(self):
            self.embed = nnx.Param(np.ones((4, 3), np.float32))
            self.blocks = nnx.List([Block(1.0), Block(3.0)])
            self.lm_head = nnx.Param(np.full((3, 4), 2.0, np.float32))

    params = nnx.state(Model(), nnx.Param)
    norms = jax.jit(tree_norms)(params)
    assert {k for k in norms if k.count("/") == 2} == {
        "norms/params/embed",
        "norms/params/blocks",
        "norms/params/lm_head",
    }
    assert float(norms["norms/params/lm_head"]) == pytest.approx(np.sqrt(48))
    assert float(norms["norms/params/blocks"]) == pytest.approx(np.sqrt(9 + 81))
    assert float(norms["norms/params"]) == pytest.approx(_reference_norm(params), rel=1e-5)
