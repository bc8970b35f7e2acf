"""Logging: TensorBoard scalars plus a metrics.jsonl for scripts and tests (peaks: accounting)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax


class TensorBoardWriter:
    """Scalars and text as TensorBoard event files, with the tensorboard package's own writer
    (tensorboardX would import torch when present: over a second of start-up for nothing)."""

    def __init__(self, logdir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(str(logdir))

    def _write(self, step: int, value) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[value])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        self._write(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2

        tensor = tensor_pb2.TensorProto(
            dtype=7,  # DT_STRING
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
            ),
        )
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        )
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))

    def add_histogram(self, tag: str, counts, step: int) -> None:
        """A histogram whose bucket i holds counts[i] (e.g. the load of expert i)."""
        from tensorboard.compat.proto import summary_pb2

        counts = [float(c) for c in counts]
        histogram = summary_pb2.HistogramProto(
            min=0.0,
            max=float(len(counts) - 1),
            num=float(sum(counts)),
            sum=float(sum(i * c for i, c in enumerate(counts))),
            sum_squares=float(sum(i * i * c for i, c in enumerate(counts))),
            bucket_limit=[i + 0.5 for i in range(len(counts))],
            bucket=counts,
        )
        self._write(step, summary_pb2.Summary.Value(tag=tag, histo=histogram))

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    """Writes scalars to TensorBoard and to metrics.jsonl; only process 0 writes."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self.writer = (
            TensorBoardWriter(run_dir / "tensorboard") if self.enabled and tensorboard else None
        )

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def histogram(self, step: int, tag: str, counts) -> None:
        if self.writer:
            self.writer.add_histogram(tag, counts, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
