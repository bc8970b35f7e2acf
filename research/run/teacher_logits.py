"""Writing a cache of a teacher's top-k logits: the teacher's run over the student's own
batches, which needs the Run builder and the training batches (so it lives here, above
research/post, whose ``teacher_cache`` reads and checks what this writes)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.config import ExperimentConfig
from research.models.loss import packed_targets
from research.post.setup import load_teacher
from research.post.teacher_cache import (
    DTYPES,
    FORMAT,
    MANIFEST,
    TeacherCacheError,
    batch_settings,
    host_batch,
    step_file,
    teacher_identity,
)
from research.run.builder import build_run
from research.run.training import _standard_batches


def write_cache(cfg: ExperimentConfig, out: str | Path, k: int, dtype: str = "float16") -> Path:
    """Run ``cfg``'s teacher (post.teacher) over the first train.steps batches ``cfg``'s
    student reads and write their top-k logits to ``out`` (the folder's layout:
    research/post/teacher_cache.py)."""
    if jax.process_count() > 1:
        raise TeacherCacheError("write the cache from one process (the files are not split)")
    if dtype not in DTYPES:
        raise TeacherCacheError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists():
        raise TeacherCacheError(f"{out} exists; remove it or name another folder")
    if not cfg.post.teacher:
        raise TeacherCacheError("set post.teacher: the run folder of the teacher to cache")
    cfg = ExperimentConfig.from_dict(cfg.to_dict())
    cfg.post.mode, cfg.post.teacher_logits = "distill", "online"
    run = build_run(cfg, "compile")  # the student's data and mesh; nothing trained
    if k > run.config.model.vocab_size:
        vocab = run.config.model.vocab_size
        raise TeacherCacheError(f"k={k} is more than the vocabulary ({vocab}); lower --k")
    graphdef, params, _ = load_teacher(run)
    value_dtype = jnp.dtype(dtype)

    @jax.jit
    def top_k(params, batch):
        inputs, _, segment_ids, _ = packed_targets(batch)
        shape = inputs.shape
        flat = lambda x: None if x is None else x.reshape(-1, shape[-1])  # noqa: E731
        logits = nnx.merge(graphdef, params)(flat(inputs), segment_ids=flat(segment_ids))
        values, ids = jax.lax.top_k(logits.astype(jnp.float32), k)
        return values.astype(value_dtype).reshape(*shape, k), ids.reshape(*shape, k)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    batches, digest = _standard_batches(run), hashlib.sha256()
    for step in range(run.config.train.steps):
        batch = next(batches)
        values, ids = top_k(params, batch)
        host = host_batch(batch)
        for key in sorted(host):
            digest.update(host[key].tobytes())
        values = np.asarray(values)
        if dtype == "bfloat16":  # npz cannot name bfloat16: keep its bits
            values = values.view(np.uint16)
        np.savez(step_file(partial, step), values=values, ids=np.asarray(ids), **host)
    manifest = {
        "format": FORMAT,
        "teacher": teacher_identity(cfg.post.teacher),
        "k": k,
        "vocab_size": run.config.model.vocab_size,
        "dtype": dtype,
        "steps": run.config.train.steps,
        "batches": batch_settings(run.config),
        "data_hash": digest.hexdigest(),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    partial.rename(out)
    return out
