"""Cached top-k teacher logits for distillation: run the teacher once over the student's
batches and keep its k largest logits per position on disk, so the distillation run reads
them instead of running the teacher in every step (``post.teacher_logits=<folder>``).

A cache folder holds:

- ``manifest.json``: the teacher (run folder, hash of its saved config, checkpoint step), k,
  the vocabulary size, the value dtype, how many steps, the batch settings the batches came
  from (data config, seq_len, batch size, grad accumulation, seed) and ``data_hash``, the
  sha256 of every cached batch's tokens in order;
- ``step_000000.npz`` ...: one file per train step: the batch as the student reads it
  (``tokens`` [accum, micro, T+1], ``segment_ids`` when packed), ``values`` [accum, micro, T, k]
  (raw logits, temperature-free: the run applies post.distill_temperature) and ``ids``
  (int32 token ids).

research/run/teacher_logits.py writes it into ``<folder>.partial`` and renames it when
complete, so a folder that exists holds every step. Reading checks the manifest against the
run (vocabulary, k, batch settings, enough steps, the same teacher) and each step's tokens
against the batch the run is about to train on, so a cache never silently pairs logits with
other tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research.config import ConfigError, ExperimentConfig, load_run_config
from research.parallel.distributed import put_global

FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "bfloat16", "float32")
TEACHER_KEYS = ("teacher_values", "teacher_ids")


class TeacherCacheError(ConfigError):
    """A teacher-logit cache that does not fit this run; the message names the fix."""


def batch_settings(cfg: ExperimentConfig) -> dict:
    """What decides the student's batches: a cache is only valid for the same settings."""
    return {
        "data": dataclasses.asdict(cfg.data),
        "seq_len": cfg.model.seq_len,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.optim.grad_accum,
        "seed": cfg.train.seed,
    }


def teacher_identity(teacher_dir: str) -> dict:
    """The teacher run folder, a hash of its saved config and its newest checkpoint step."""
    config = load_run_config(teacher_dir).to_json()
    steps = [int(p.name) for p in (Path(teacher_dir) / "checkpoints").glob("*") if p.name.isdigit()]
    return {
        "run": str(teacher_dir),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "step": max(steps, default=None),
    }


def step_file(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}.npz"


def host_batch(batch) -> dict[str, np.ndarray]:
    batch = batch if isinstance(batch, dict) else {"tokens": batch}
    return {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}


class TeacherCache:
    """A written cache folder, checked against a run before it is read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            partial = self.folder.with_name(self.folder.name + ".partial")
            hint = f" ({partial} is an unfinished one)" if partial.exists() else ""
            raise TeacherCacheError(
                f"post.teacher_logits={folder} is not a teacher-logit cache (no {MANIFEST})"
                f"{hint}; write it with `research post-teacher-logits`, or set "
                "post.teacher_logits=online"
            )
        self.manifest = json.loads(path.read_text())

    def check(self, cfg: ExperimentConfig) -> None:
        """Raise TeacherCacheError if this cache does not belong to ``cfg``'s run (resolved)."""
        m, post, where = self.manifest, cfg.post, f"the cache {self.folder}"
        if m["vocab_size"] != cfg.model.vocab_size:
            raise TeacherCacheError(
                f"{where} holds a teacher with a vocabulary of {m['vocab_size']} tokens, this "
                f"student {cfg.model.vocab_size}: distillation compares their distributions "
                "token by token, so use a teacher with the student's tokenizer and vocabulary"
            )
        if m["k"] != post.teacher_top_k:
            raise TeacherCacheError(
                f"{where} holds the top {m['k']} logits per position, post.teacher_top_k is "
                f"{post.teacher_top_k}; set post.teacher_top_k={m['k']} or rewrite the cache "
                f"with --k {post.teacher_top_k}"
            )
        mine = batch_settings(cfg)
        if m["batches"] != mine:
            diff = [
                f"{key}: {m['batches'].get(key)!r} there, {value!r} here"
                for key, value in mine.items()
                if m["batches"].get(key) != value
            ]
            raise TeacherCacheError(
                f"{where} was written for other batches ({'; '.join(diff)}), so its logits "
                "belong to other tokens (data hash differs); rewrite it for this config"
            )
        if m["steps"] < cfg.train.steps:
            raise TeacherCacheError(
                f"{where} covers {m['steps']} steps, this run trains {cfg.train.steps}; rewrite "
                f"it with --set train.steps={cfg.train.steps} or train fewer steps"
            )
        if post.teacher and teacher_identity(post.teacher) != m["teacher"]:
            raise TeacherCacheError(
                f"{where} was written from the teacher {m['teacher']}, not post.teacher="
                f"{post.teacher} as it is now; rewrite the cache or set post.teacher=''"
            )

    def read(self, step: int) -> dict[str, np.ndarray]:
        with np.load(step_file(self.folder, step)) as shard:
            out = dict(shard)
        if self.manifest["dtype"] == "bfloat16":
            out["values"] = out["values"].view(jnp.bfloat16)
        return out


class CachedTeacherBatches:
    """The student's own batches with the cached teacher logits of each step added
    (``teacher_values``, ``teacher_ids``); its checkpointed state is the inner loader's."""

    def __init__(self, inner, cache: TeacherCache, first_step: int, sharding):
        self.inner, self.cache, self.step, self.sharding = inner, cache, first_step, sharding

    def __next__(self):
        batch = next(self.inner)
        shard = self.cache.read(self.step)
        parts = batch if isinstance(batch, dict) else {"tokens": batch}
        for key, value in parts.items():  # this process' blocks: works on many hosts too
            cached = shard.get(key)
            same = cached is not None and cached.shape == value.shape
            for block in value.addressable_shards if same else ():
                same = same and np.array_equal(cached[block.index], np.asarray(block.data))
            if not same:
                raise TeacherCacheError(
                    f"step {self.step} of the cache {self.cache.folder} holds logits for other "
                    f"{key} than this run's batch (data hash mismatch); rewrite the cache"
                )
        self.step += 1
        batch = dict(batch) if isinstance(batch, dict) else {"tokens": batch}
        batch["teacher_values"] = put_global(shard["values"], self.sharding)
        batch["teacher_ids"] = put_global(shard["ids"], self.sharding)
        return batch

    def get_state(self) -> dict:
        return self.inner.get_state()


def student_batch(batch: dict):
    """The batch without the teacher's logits, in the form packed_targets reads."""
    rest = {k: v for k, v in batch.items() if k not in TEACHER_KEYS}
    return rest["tokens"] if set(rest) == {"tokens"} else rest
