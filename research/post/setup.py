"""Where post-training plugs into the Run builder and ``train()``: the starting parameters,
the objective for the train step, the batches and the task-accuracy hook. Each mode reuses
the standard loop, hooks, checkpoints and ledger; only these pieces differ."""

from __future__ import annotations

import numpy as np

from research.config import ConfigError
from research.hf.load import is_hf_folder
from research.parallel.mesh import batch_sharding
from research.post import chat
from research.post import data as post_data
from research.post.init import check_compatible, load_params, post_tokenizer
from research.post.objectives import (
    cached_distill_objective,
    distill_objective,
    grpo_objective,
    preference_objective,
    reward_objective,
)
from research.post.teacher_cache import CachedTeacherBatches, TeacherCache
from research.train.shardings import abstract_params, param_shardings
from research.train.state import abstract_like

REFERENCE_FILE = "reference_logprobs.npz"


def check_inputs(cfg) -> None:
    """Read and check every post-training input before anything is allocated: the data file
    (conversations, pairs or problems), the held-out problems and the runs it starts from."""
    post = cfg.post
    chat_template(cfg)  # readable, before any work
    if post.mode == "sft":
        chat.load_conversations(post.data)
    elif post.mode in ("reward", "dpo"):
        chat.load_pairs(post.data)
    elif post.mode == "grpo":
        post_data.load_problems(post.data, post.task_digits)
    if post.eval_data and post.mode == "reward":
        chat.load_pairs(post.eval_data)
    elif post.eval_data:
        post_data.load_problems(post.eval_data, post.task_digits)
    for what, other in (("post.init_from", post.init_from), ("post.teacher", post.teacher)):
        if other:
            check_compatible(cfg, other, what)
    if post.mode == "distill" and post.teacher_logits != "online":
        TeacherCache(post.teacher_logits).check(cfg)  # cfg is resolved (vocabulary known)


def start_params(run):
    """post.init_from's newest parameters, in this run's shardings."""
    return load_params(run.config, run.config.post.init_from, abstract_like(run.state["params"]))


def objective(run):
    """The train step's objective for post.mode (None: the standard next-token loss)."""
    post = run.config.post
    if post.mode == "reward":
        return reward_objective()
    if post.mode == "dpo":
        return preference_objective(
            post.preference_loss, post.beta, post.simpo_gamma, post.rpo_alpha
        )
    if post.mode == "grpo":
        return grpo_objective(post.clip_eps, post.kl_coef)
    if post.mode == "distill" and post.teacher_logits != "online":
        return cached_distill_objective(post.distill_temperature, post.distill_alpha)
    if post.mode == "distill":
        graphdef, params, _ = load_teacher(run)
        return distill_objective(graphdef, params, post.distill_temperature, post.distill_alpha)
    return None


def load_teacher(run):
    """(graphdef, params, config) of post.teacher, in this run's mesh; another vocabulary
    than the student's is an error."""
    post = run.config.post
    teacher_cfg = check_compatible(run.config, post.teacher, "post.teacher")
    teacher_model = teacher_cfg.model.resolved(vocab_size=run.data.vocab_size)
    if teacher_model.vocab_size != run.config.model.vocab_size:
        raise ConfigError(
            f"post.teacher={post.teacher} has a vocabulary of {teacher_model.vocab_size} "
            f"tokens, this student {run.config.model.vocab_size}: distillation compares "
            "their distributions token by token, so set the same model.vocab_size"
        )
    graphdef, _ = param_shardings(teacher_model, run.mesh)
    teacher_run = type(run.config).from_dict({**run.config.to_dict(), "model": {}})
    teacher_run.model = teacher_model
    params = load_params(
        teacher_run, post.teacher, abstract_params(teacher_model, run.mesh), "post.teacher"
    )
    return graphdef, params, teacher_cfg


def with_teacher_logits(run, standard):
    """Distillation from a cache: the standard batches with each step's cached teacher
    logits added (checked against the run first); online: the standard batches."""
    post = run.config.post
    if post.mode != "distill" or post.teacher_logits == "online":
        return standard
    cache = TeacherCache(post.teacher_logits)  # checked by check_inputs
    return CachedTeacherBatches(standard, cache, run.step, batch_sharding(run.mesh, 1))


def chat_template(cfg):
    """post.chat_template's template (research/post/templates.py), or None: ours."""
    name = cfg.post.chat_template
    if not name:
        return None
    from research.post.templates import ChatTemplate, ChatTemplateError

    if name == "tokenizer":
        if not cfg.post.init_from or not is_hf_folder(cfg.post.init_from):
            raise ChatTemplateError(
                "post.chat_template=tokenizer takes the template of post.init_from's HF folder, "
                "but post.init_from is not one; name a tokenizer folder instead"
            )
        name = cfg.post.init_from
    return ChatTemplate.from_folder(name)


def batches(run):
    """SFT, DPO or GRPO batches positioned where the run's checkpoint left off (None: the
    standard corpus batches, as for distillation)."""
    cfg = run.config
    post, tokenizer = cfg.post, post_tokenizer(cfg, run.data.tokenizer)
    seq, accum = cfg.model.seq_len, cfg.optim.grad_accum
    template = chat_template(cfg)
    if post.mode == "sft":
        rows = post_data.sft_rows(post.data, tokenizer, seq, template)
        source = post_data.RowBatches(rows, cfg.train.batch_size, accum, cfg.train.seed, run.mesh)
    elif post.mode in ("reward", "dpo"):
        rows = post_data.pair_rows(post.data, tokenizer, seq, template)
        if post.mode == "dpo":
            rows.update(_reference(run, rows))
        source = post_data.RowBatches(rows, cfg.train.batch_size, accum, cfg.train.seed, run.mesh)
    elif post.mode == "grpo":
        problems = post_data.load_problems(post.data, post.task_digits)
        source = post_data.GroupSamples(run, problems, start_params(run), tokenizer, template)
    else:
        return None
    if run.data_state is not None:
        source.set_state(run.data_state)
    return source


def _reference(run, rows) -> dict[str, np.ndarray]:
    """Reference log-probs from the starting model, computed once and kept in the run folder
    (a resumed run's parameters are no longer the reference)."""
    path = run.run_dir / REFERENCE_FILE
    if path.exists():
        with path.open("rb") as file:  # through the run's path type: local or gs://
            return dict(np.load(file))
    if run.step:
        raise ConfigError(
            f"{path} is missing but {run.run_dir} is resumed at step {run.step}: its reference "
            "log-probs cannot be recomputed from trained parameters; restore the file or "
            "--restart"
        )
    refs = post_data.reference_logprobs(run.graphdef, start_params(run), rows)
    with path.open("wb") as file:
        np.savez(file, **refs)
    return refs


def task_accuracy_hook(run, logger, bar=None):
    """Greedy accuracy on post.eval_data's first post.eval_problems problems (a reward
    model: its pair accuracy on post.eval_data's held-out pairs)."""
    from research.post.evaluate import task_accuracy

    post = run.config.post
    if post.mode == "reward":
        return _pair_accuracy_hook(run, logger, bar)
    problems = post_data.load_problems(post.eval_data, post.task_digits)[: post.eval_problems]
    tokenizer = post_tokenizer(run.config, run.data.tokenizer)
    template = chat_template(run.config)

    def evaluate(trainer) -> None:
        accuracy = task_accuracy(
            run.graphdef,
            trainer.state["params"],
            tokenizer,
            problems,
            post.max_new_tokens,
            template=template,
        )
        logger.scalars(trainer.step, {"post/task_accuracy": accuracy})
        line = f"step {trainer.step}: task accuracy {accuracy:.3f} on {len(problems)} problems"
        bar.write(line) if bar is not None else print(line)

    return evaluate


def _pair_accuracy_hook(run, logger, bar=None):
    tokenizer = post_tokenizer(run.config, run.data.tokenizer)
    rows = post_data.pair_rows(run.config.post.eval_data, tokenizer, run.config.model.seq_len)

    def evaluate(trainer) -> None:
        accuracy = post_data.pair_accuracy(run.graphdef, trainer.state["params"], rows)
        logger.scalars(trainer.step, {"post/heldout_pair_accuracy": accuracy})
        pairs = len(rows["chosen"])
        line = f"step {trainer.step}: held-out pair accuracy {accuracy:.3f} ({pairs} pairs)"
        bar.write(line) if bar is not None else print(line)

    return evaluate
