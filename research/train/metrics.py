"""Logging: TensorBoard scalars plus a metrics.jsonl for scripts and tests (peaks: accounting)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from research.storage import AppendFile, run_path, write_with_retries

# What each scalar means, shown beside its chart in TensorBoard (the `/by_tokens` twin of a tag
# shares its description). "prefix/*" entries cover tags named at run time, such as per-group norms.
DESCRIPTIONS: dict[str, str] = {
    "train/loss": "Training cross-entropy (nats per token) on the batch of the logged step.",
    "train/grad_norm": "Global L2 norm of the gradient before clipping.",
    "train/lr": "Learning rate of the logged step (after warmup and decay).",
    "val/loss": "Cross-entropy (nats per token) on the held-out validation split.",
    "val/bpb": "Validation bits per byte: loss / ln 2 x tokens per byte; tokenizer-independent.",
    "perf/tokens_per_second": "Training tokens per second over the window since the last log "
    "(evaluation, checkpoints and compilation excluded).",
    "perf/step_time_ms": "Mean wall time of one training step over the window since the last log.",
    "perf/mfu": "Model FLOPs utilisation: model FLOPs per second / peak FLOP/s of the devices.",
    "perf/compile_seconds": "Seconds spent compiling the train step (not counted as training).",
    "progress/tokens_seen": "Training tokens consumed so far, across all processes.",
    "norms/params": "Global L2 norm of the parameters.",
    "norms/params/*": "L2 norm of this top-level group's parameters.",
    "norms/updates": "Global L2 norm of the last parameter update (new minus old parameters).",
    "norms/updates/*": "L2 norm of this top-level group's last parameter update.",
    "norms/update_ratio": "Update norm / parameter norm: ~1e-3 is typical; far above, lr too high.",
    "moe/load_balance_loss": "Switch/GShard balancing loss: n_experts x sum(load x importance); "
    "1.0 when routing is uniform.",
    "moe/router_z_loss": "Mean squared logsumexp of the router logits (keeps logits bounded).",
    "moe/dropped_fraction": "Share of token-expert assignments dropped by expert capacity.",
    "moe/router_entropy": "Mean entropy (nats) of the router's distribution over experts.",
    "moe/max_load": "Busiest expert's share of assignments x n_experts: 1.0 is perfect balance.",
    "moe/expert_load/*": "Share of this MoE layer's token-expert assignments taken by each expert "
    "(one bucket per expert, index on the x axis).",
    "moe/expert_load_heatmap": "Load (share x n_experts; 1.0 = fair share) of each expert "
    "(columns) in each MoE layer (rows).",
}

# The twin of each scalar stepped by tokens seen is TAG + TOKENS_SUFFIX. A suffix, not a prefix:
# TensorBoard sorts sections and cards by name, so each chart sits beside its twin in its own
# section, where a `by_tokens/` section would come first and push the step charts below a dozen
# twins; a separate `tokens` run would double the run list and mix both axes in one chart.
TOKENS_SUFFIX = "/by_tokens"


def describe(tag: str) -> str | None:
    """DESCRIPTIONS' text for a tag: exact, else its longest ``prefix/*`` entry, else None."""
    tag = tag.removesuffix(TOKENS_SUFFIX)
    if tag in DESCRIPTIONS:
        return DESCRIPTIONS[tag]
    parts = tag.split("/")
    for end in range(len(parts) - 1, 0, -1):
        pattern = "/".join(parts[:end]) + "/*"
        if pattern in DESCRIPTIONS:
            return DESCRIPTIONS[pattern]
    return None


def scalars_layout():
    """The Custom Scalars tab: train and val loss overlaid (by step and by tokens), perf grouped."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    def chart(title: str, *tags: str):
        content = layout_pb2.MultilineChartContent(tag=list(tags))
        return layout_pb2.Chart(title=title, multiline=content)

    def category(title: str, *charts, closed: bool = False):
        return layout_pb2.Category(title=title, chart=list(charts), closed=closed)

    return layout_pb2.Layout(
        category=[
            category(
                "loss",
                chart("train and val loss, by step", r"^train/loss$", r"^val/loss$"),
                chart("train and val loss, by tokens", r"^(train|val)/loss/by_tokens$"),
                chart("val bits per byte", r"^val/bpb$"),
            ),
            category(
                "perf",
                chart("tokens per second", r"^perf/tokens_per_second$"),
                chart("step time (ms)", r"^perf/step_time_ms$"),
                chart("MFU", r"^perf/mfu$"),
                chart("compile seconds", r"^perf/compile_seconds$"),
            ),
            category(
                "optimizer",
                chart("learning rate", r"^train/lr$"),
                chart("gradient norm", r"^train/grad_norm$"),
                chart("parameter norms", r"^norms/params(/(?!by_tokens$)[^/]+)?$"),
                chart("update / parameter norm", r"^norms/update_ratio$"),
            ),
            category(
                "moe",
                chart("balancing losses", r"^moe/(load_balance|router_z)_loss$"),
                chart("max load and dropped fraction", r"^moe/(max_load|dropped_fraction)$"),
                chart("router entropy", r"^moe/router_entropy$"),
                closed=True,
            ),
        ]
    )


def _hparam_value(value):
    """A config value as one the HParams plugin stores: bool, number or string."""
    if isinstance(value, bool | int | float | str):
        return value
    if value is None:
        return "None"
    return json.dumps(value, default=str)


def expert_load_png(load, layers: list[int] | None = None) -> tuple[bytes, int, int]:
    """A layers x experts heat map of load x n_experts (1.0 = fair share) with its colour bar.

    Diverging colours centred on the fair share: blue experts are starved, red ones overloaded;
    the scale runs from 0 to at least 2 so that images of successive steps compare.
    Returns (PNG bytes, height, width).
    """
    import io

    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    load = np.asarray(load, dtype=np.float64)
    n_layers, n_experts = load.shape
    relative = load * n_experts
    layers = list(range(n_layers)) if layers is None else list(layers)
    # Fixed margins in inches (tight_layout would draw the figure twice: ~2x the time).
    width, height = min(2.5 + 0.4 * n_experts, 16), min(1.5 + 0.35 * n_layers, 12)
    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(
        left=0.7 / width, right=1 - 0.2 / width, bottom=0.6 / height, top=1 - 0.2 / height
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(relative.max())))
    image = axes.imshow(relative, cmap=matplotlib.colormaps["RdBu_r"], norm=norm, aspect="auto")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_xticks(range(n_experts))
    axes.set_yticks(range(n_layers), [str(i) for i in layers])
    figure.colorbar(image, ax=axes, label="load / fair share")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    width, height = figure.canvas.get_width_height()
    return buffer.getvalue(), height, width


def events_dir(run_dir: Path | str):
    """Where a run's TensorBoard events are: the run directory itself, so that
    ``tensorboard --logdir runs`` names the run after it; ``tensorboard/`` inside it for runs
    written before that (still read, and still appended to when such a run resumes)."""
    legacy = run_path(run_dir) / "tensorboard"
    return legacy if legacy.is_dir() else run_path(run_dir)


class TensorBoardWriter:
    """Event files with the tensorboard package's own writer and protos, no TensorFlow
    (tensorboardX would import torch when present: over a second of start-up for nothing).
    Each tag's description (``describe``) is attached the first time the tag is written.

    A ``gs://``/``s3://`` logdir: object stores cannot append, and tensorboard's fsspec file
    system overwrites instead, keeping only the last flush's events; so the event file is
    written locally and copied whole to the URL at each flush and at close."""

    def __init__(self, logdir: Path | str):
        import tempfile

        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._remote = str(logdir) if "://" in str(logdir) else None
        local = tempfile.mkdtemp(prefix="research-tb-") if self._remote else str(logdir)
        self._writer = EventFileWriter(local)
        self._described: set[str] = set()

    def _write(self, step: int, *values) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=list(values))
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def _metadata(self, tag: str, plugin: str):
        """SummaryMetadata with the plugin name and, on a tag's first write, its description."""
        from tensorboard.compat.proto import summary_pb2

        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = plugin
        if tag not in self._described:
            self._described.add(tag)
            metadata.summary_description = describe(tag) or ""
        return metadata

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """A float32 scalar tensor, as ``tf.summary.scalar`` writes it: TensorBoard's default
        (Rust) loader drops the description of old-style ``simple_value`` scalars."""
        import numpy as np
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.util import tensor_util

        tensor = tensor_util.make_tensor_proto(np.float32(value))
        metadata = self._metadata(tag, "scalars")
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.util import tensor_util

        tensor = tensor_util.make_tensor_proto([text.encode("utf-8")])
        metadata = self._metadata(tag, "text")
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))

    def add_histogram(self, tag: str, counts, step: int) -> None:
        """A histogram whose bucket i, [i - 0.5, i + 0.5], holds counts[i] (the load of expert i).

        TensorBoard reads a HistogramProto's buckets as [min, limit 0], [limit 0, limit 1], ...,
        [limit n-2, max]: the outer edges are ``min`` and ``max``, so they sit half a bucket
        outside the first and last index for every bucket to have width 1.
        """
        from tensorboard.compat.proto import summary_pb2

        counts = [float(c) for c in counts]
        histogram = summary_pb2.HistogramProto(
            min=-0.5,
            max=len(counts) - 0.5,
            num=float(sum(counts)),
            sum=float(sum(i * c for i, c in enumerate(counts))),
            sum_squares=float(sum(i * i * c for i, c in enumerate(counts))),
            bucket_limit=[i + 0.5 for i in range(len(counts))],
            bucket=counts,
        )
        metadata = self._metadata(tag, "histograms")
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=metadata, histo=histogram))

    def add_image_png(self, tag: str, png: bytes, height: int, width: int, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        image = summary_pb2.Summary.Image(
            height=height,
            width=width,
            colorspace=4,
            encoded_image_string=png,  # RGBA
        )
        metadata = self._metadata(tag, "images")
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=metadata, image=image))

    def add_hparams(self, hparams: dict, metric_tags: list[str], trial_id: str) -> None:
        """HParams tab: the experiment's columns (each run writes the same ones) and this run.

        Columns are typed without a domain, so the filters accept every run's values; the
        metrics are given so the table shows these tags only, not every scalar."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2

        values = {name: _hparam_value(value) for name, value in hparams.items()}
        infos = []
        for name, value in sorted(values.items()):
            info = api_pb2.HParamInfo(name=name)
            if isinstance(value, bool):
                summary_v2.Discrete([False, True]).update_hparam_info(info)
            else:
                info.type = (
                    api_pb2.DATA_TYPE_STRING
                    if isinstance(value, str)
                    else (api_pb2.DATA_TYPE_FLOAT64)
                )
            infos.append(info)
        metrics = [
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), description=describe(tag) or "")
            for tag in metric_tags
        ]
        experiment = api_pb2.Experiment(
            hparam_infos=infos, metric_infos=metrics, time_created_secs=time.time()
        )
        data = plugin_data_pb2.HParamsPluginData(experiment=experiment)
        self._write(
            0,
            summary_pb2.Summary.Value(
                tag=metadata.EXPERIMENT_TAG,
                metadata=metadata.create_summary_metadata(data),
                tensor=metadata.NULL_TENSOR,
            ),
            *summary_v2.hparams_pb(values, trial_id=trial_id).value,
        )

    def add_layout(self, layout) -> None:
        """The Custom Scalars tab's layout (a layout_pb2.Layout)."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.custom_scalar import metadata
        from tensorboard.util import tensor_util

        tensor = tensor_util.make_tensor_proto([layout.SerializeToString()])
        value = summary_pb2.Summary.Value(
            tag=metadata.CONFIG_SUMMARY_TAG,
            metadata=metadata.create_summary_metadata(),
            tensor=tensor,
        )
        self._write(0, value)

    def flush(self) -> None:
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        self._writer.close()
        self._upload()

    def _upload(self) -> None:
        if self._remote is None:
            return
        import fsspec

        local = Path(self._writer.get_logdir())
        fs, root = fsspec.core.url_to_fs(self._remote)
        for path in local.iterdir():  # the whole file each time: one object write
            write_with_retries(
                run_path(self._remote) / path.name,
                lambda path=path: fs.put_file(str(path), f"{root.rstrip('/')}/{path.name}"),
                keep=lambda: str(local),  # a folder of its own, left in place
            )


class MetricsLogger:
    """Writes scalars to TensorBoard and to metrics.jsonl; only process 0 writes.

    TensorBoard events go into the run directory itself (``events_dir``), with the Custom
    Scalars layout written on opening. In a ``gs://``/``s3://`` run directory both files are
    written locally and uploaded whole at each ``flush`` (the trainer flushes as each checkpoint
    becomes durable) and at ``close``."""

    def __init__(self, run_dir: Path | str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.run_name = run_path(run_dir).name
        self.jsonl = AppendFile(run_path(run_dir) / "metrics.jsonl") if self.enabled else None
        self.writer = (
            TensorBoardWriter(events_dir(run_dir)) if self.enabled and tensorboard else None
        )
        if self.writer:
            self.writer.add_layout(scalars_layout())

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text)

    def scalars(self, step: int, values: dict[str, float], tokens: int | None = None) -> None:
        """Scalars at ``step``; with ``tokens`` (tokens seen so far) also ``progress/tokens_seen``
        and a ``<tag>/by_tokens`` twin of each tag stepped by tokens, so that runs with different
        batch sizes line up in one chart."""
        if not self.enabled:
            return
        row = {"step": step} if tokens is None else {"step": step, "tokens": int(tokens)}
        self.jsonl.write(json.dumps({**row, **values}) + "\n")
        self.jsonl.flush(upload=False)  # on disk now; an object store gets it at flush()
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            if tokens is not None:
                self.writer.add_scalar("progress/tokens_seen", tokens, step)
                for key, value in values.items():
                    self.writer.add_scalar(key + TOKENS_SUFFIX, value, int(tokens))

    def histogram(self, step: int, tag: str, counts) -> None:
        if self.writer:
            self.writer.add_histogram(tag, counts, step)

    def expert_load(
        self, step: int, load, layers: list[int] | None = None, image: bool = True
    ) -> None:
        """Per-layer expert load ([MoE layers, experts], shares summing to 1 per row): one
        histogram per layer (``moe/expert_load/layer_{i}``) and, with ``image``, one heat map
        (``moe/expert_load_heatmap``). ``layers``: the model layer of each row (default 0..).
        Drawing the heat map with matplotlib costs far more than a train step of a small model:
        pass ``image=False`` on frequent logs and draw it at evaluation cadence."""
        if not self.writer:
            return
        import numpy as np

        load = np.asarray(load, dtype=np.float64)
        if load.ndim != 2:
            raise ValueError(
                f"expert_load takes load[layers, experts]; got shape {load.shape}. Pass the "
                "per-layer loads (the train step's moe/expert_load), not their mean over layers."
            )
        layers = list(range(load.shape[0])) if layers is None else list(layers)
        if len(layers) != load.shape[0]:
            raise ValueError(
                f"expert_load got {load.shape[0]} rows of loads but {len(layers)} layer indices; "
                "pass one index per MoE layer (ModelConfig.moe_layers())."
            )
        for layer, row in zip(layers, load, strict=True):
            self.writer.add_histogram(f"moe/expert_load/layer_{layer}", row, step)
        if not image:
            return
        png, height, width = expert_load_png(load, layers)
        self.writer.add_image_png("moe/expert_load_heatmap", png, height, width, step)

    def hparams(
        self, flat_config: dict, metric_tags: list[str] | tuple = ("val/loss", "train/loss")
    ):
        """HParams tab: ``flat_config`` (e.g. ``flatten(cfg.to_dict())``) as this run's
        hyperparameters, ``metric_tags`` as its metric columns; the run's name is its trial."""
        if self.writer:
            self.writer.add_hparams(flat_config, list(metric_tags), self.run_name)

    def run_info(self, info: dict) -> None:
        """``run_info.run_metadata()`` as a Markdown table in the Text tab (tag ``run``)."""
        from research.train.run_info import metadata_markdown

        self.text("run", metadata_markdown(info))

    def flush(self) -> None:
        if self.jsonl:
            self.jsonl.flush()
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
