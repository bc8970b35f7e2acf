"""Batches for post-training runs, in the train step's layout ([accum, micro_batch, ...] global
arrays) with a checkpointable position, so a killed run resumes with the same batches.

- SFT: conversations encoded with the chat template, packed with segment ids and a loss mask.
- DPO: pairs padded to the context, with reference log-probs computed once from the starting
  model and kept in the run folder (``reference_logprobs.npz``), so a resumed run reuses them.
- GRPO: prompts sampled ``group_size`` times by the current policy, rewarded by the task's
  exact-match check; advantages and reference log-probs are computed here on the host side.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.config import ConfigError
from research.parallel.distributed import put_global
from research.parallel.mesh import batch_sharding
from research.post import chat
from research.post.evaluate import answer_text, complete, encode_prompts, stop_token
from research.post.losses import group_advantages, sequence_logprobs, token_logprobs
from research.post.task import problem_from_row, reward


class RowBatches:
    """Fixed rows [N, ...] served as shuffled batches, epoch after epoch; position = batches
    served so far (the checkpointed state)."""

    def __init__(self, rows: dict[str, np.ndarray], batch_size: int, accum: int, seed: int, mesh):
        self.rows, self.batch_size, self.accum, self.seed = rows, batch_size, accum, seed
        self.count = len(next(iter(rows.values())))
        self.sharding = batch_sharding(mesh, leading_dims=1)
        self.position = 0

    def indices(self, position: int) -> np.ndarray:
        flat = np.arange(position * self.batch_size, (position + 1) * self.batch_size)
        epochs = flat // self.count
        out = np.empty_like(flat)
        for epoch in np.unique(epochs):
            order = np.random.default_rng((self.seed, int(epoch))).permutation(self.count)
            out[epochs == epoch] = order[flat[epochs == epoch] % self.count]
        return out

    def __next__(self):
        picked = self.indices(self.position)
        self.position += 1
        shape = (self.accum, self.batch_size // self.accum)
        return {
            k: put_global(v[picked].reshape(*shape, *v.shape[1:]), self.sharding)
            for k, v in self.rows.items()
        }

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def _encoder(tokenizer, template):
    """(ids, mask) of a conversation: our template, or a tokenizer's chat template."""
    if template is None:
        return lambda messages: chat.encode(tokenizer, messages)
    return lambda messages: template.encode(tokenizer, messages)


def sft_rows(path: str, tokenizer, seq_len: int, template=None) -> dict[str, np.ndarray]:
    encode = _encoder(tokenizer, template)
    examples = [encode(m) for m in chat.load_conversations(path)]
    return chat.pack(examples, seq_len + 1)


def _pad(seqs: list[np.ndarray], length: int, where: str) -> np.ndarray:
    out = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ConfigError(
                f"{where}: example {i} is {len(s)} tokens, more than model.seq_len + 1 = "
                f"{length}; raise model.seq_len"
            )
        out[i, : len(s)] = s
    return out


def pair_rows(path: str, tokenizer, seq_len: int, template=None) -> dict[str, np.ndarray]:
    encode = _encoder(tokenizer, template)
    rows: dict[str, list] = {k: [] for k in ("chosen", "chosen_mask", "rejected", "rejected_mask")}
    for pair in chat.load_pairs(path):
        for side in ("chosen", "rejected"):
            answer = {"role": "assistant", "content": getattr(pair, side)}
            ids, mask = encode([*pair.prompt, answer])
            rows[side].append(ids)
            rows[f"{side}_mask"].append(mask)
    return {k: _pad(v, seq_len + 1, path) for k, v in rows.items()}


def reference_logprobs(graphdef, params, rows: dict[str, np.ndarray], batch: int = 256):
    """Summed response log-probs of chosen and rejected under ``params`` (the reference)."""

    @jax.jit
    def score(params, tokens, mask):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return sequence_logprobs(logits, tokens[:, 1:], mask[:, 1:])

    out = {}
    for side in ("chosen", "rejected"):
        parts = [
            score(params, rows[side][i : i + batch], rows[f"{side}_mask"][i : i + batch])
            for i in range(0, len(rows[side]), batch)
        ]
        out[f"ref_{side}"] = np.concatenate([np.asarray(p) for p in parts]).astype(np.float32)
    return out


def pair_accuracy(graphdef, params, rows: dict[str, np.ndarray], batch: int = 256) -> float:
    """Fraction of pairs whose chosen response the reward model scores higher."""
    from research.post.objectives import response_rewards

    @jax.jit
    def score(params, tokens, mask):
        return response_rewards(nnx.merge(graphdef, params), tokens, mask)

    right = 0
    for i in range(0, len(rows["chosen"]), batch):
        part = {k: v[i : i + batch] for k, v in rows.items()}
        r_c = score(params, part["chosen"], part["chosen_mask"])
        r_r = score(params, part["rejected"], part["rejected_mask"])
        right += int(np.sum(np.asarray(r_c) > np.asarray(r_r)))
    return right / len(rows["chosen"])


class GroupSamples:
    """GRPO batches: each step, batch_size / group_size problems, each answered group_size
    times by the current policy (``bind`` gives the trainer whose state is sampled)."""

    def __init__(self, run, problems, ref_params, tokenizer, template=None):
        cfg = run.config
        self.template, self.stop = template, stop_token(tokenizer, template)
        self.cfg, self.post, self.problems = cfg, cfg.post, problems
        self.graphdef, self.ref_params, self.tokenizer = run.graphdef, ref_params, tokenizer
        self.sharding = batch_sharding(run.mesh, leading_dims=1)
        self.position, self.trainer = 0, None
        if cfg.train.batch_size % cfg.post.group_size:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} must be a multiple of "
                f"post.group_size={cfg.post.group_size} (whole groups per batch)"
            )
        graphdef = run.graphdef

        @jax.jit
        def ref_token_logprobs(params, tokens):
            return token_logprobs(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])

        self._ref = ref_token_logprobs

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def __next__(self):
        cfg, post = self.cfg, self.post
        groups = cfg.train.batch_size // post.group_size
        rng = np.random.default_rng((cfg.train.seed, self.position))
        chosen = [self.problems[int(i)] for i in rng.integers(len(self.problems), size=groups)]
        prompts = [
            p
            for p in encode_prompts(self.tokenizer, chosen, self.template)
            for _ in range(post.group_size)
        ]
        # One seed per sample, from (run seed, step, sample): a resumed run draws the same.
        seeds = np.random.default_rng((cfg.train.seed, self.position, 1)).integers(
            2**31, size=len(prompts)
        )
        self.position += 1
        new = complete(
            self.graphdef,
            self.trainer.state["params"],
            self.tokenizer,
            prompts,
            post.max_new_tokens,
            seeds.tolist(),
            post.temperature,
            self.stop,
        )
        tokens = np.zeros((len(new), cfg.model.seq_len + 1), np.int32)
        mask = np.zeros_like(tokens)
        rewards = np.zeros(len(new), np.float32)
        for i, answer in enumerate(new):  # each up to and with its stop token
            full = np.concatenate([prompts[i], answer])[: tokens.shape[1]]
            tokens[i, : len(full)] = full
            mask[i, len(prompts[i]) : len(full)] = 1
            text = answer_text(self.tokenizer, answer, self.stop)
            rewards[i] = reward(text, chosen[i // post.group_size])
        advantages = np.asarray(group_advantages(jnp.asarray(rewards.reshape(groups, -1))))
        ref_logp = np.asarray(self._ref(self.ref_params, tokens))
        batch = {
            "tokens": tokens,
            "mask": mask,
            "advantages": advantages.reshape(-1),
            "ref_logp": ref_logp,
            "reward": rewards,
        }
        shape = (cfg.optim.grad_accum, cfg.train.batch_size // cfg.optim.grad_accum)
        return {
            k: put_global(v.reshape(*shape, *v.shape[1:]), self.sharding) for k, v in batch.items()
        }

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def load_problems(path: str, digits: int):
    if not Path(path).is_file():
        raise ConfigError(f"{path} does not exist; write the task with `research post-data`")
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not JSON lines ({error})") from None
    if not rows or not all(isinstance(r, dict) and "a" in r and "b" in r for r in rows):
        raise ConfigError(
            f"{path}: problems are JSON lines with 'a' and 'b' (research/post/task.py writes them)"
        )
    return [problem_from_row(r, digits) for r in rows]
