"""Post-training through the standard Run builder and loop (research/post/): chat encoding and
packing against a slow per-example reference, assistant-only masking, each mode resuming after an
interruption with the losses of an uninterrupted run, DPO starting exactly at its reference,
distillation at alpha 0 being plain training, cached top-k teacher logits giving the online
teacher's KL, and bad inputs as clear errors."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import read_metrics

from research.cli import main
from research.config import ConfigError, validate
from research.data.tokenizer import CharTokenizer
from research.models.loss import packed_targets
from research.post import chat
from research.post import data as post_data
from research.post.task import Problem, reward, write_task
from research.post.teacher_cache import TeacherCache, TeacherCacheError
from research.run import train
from research.run.teacher_logits import write_cache

TOKENIZER = CharTokenizer.train("User: Assistant:System\n0123456789+= abc")


def test_encode_masks_only_the_assistants_tokens():
    messages = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": "12+3"},
        {"role": "assistant", "content": "15"},
    ]
    ids, mask = chat.encode(TOKENIZER, messages)
    text = TOKENIZER.decode(ids)
    assert text == "System: abc\nUser: 12+3\nAssistant: 15\n"
    trained = "".join(c for c, m in zip(text, mask, strict=True) if m)
    assert trained == "15\n"  # the answer and its closing newline, nothing of the prompt
    assert text.endswith(chat.render_prompt(messages[:2])[-len("Assistant: ") :] + "15\n")


def test_packing_keeps_each_example_whole_and_marked():
    examples = [
        chat.encode(
            TOKENIZER, [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        )
        for u, a in [("1+1", "2"), ("12+30", "42"), ("9+9", "18"), ("0+0", "0")]
    ]
    packed = chat.pack(examples, 40)
    # Reference: read every row's segments back and compare with the examples in order.
    found = []
    for tokens, segments, mask in zip(
        *(packed[k] for k in ("tokens", "segment_ids", "loss_mask")), strict=True
    ):
        for s in range(1, segments.max() + 1):
            where = segments == s
            assert np.all(np.diff(np.flatnonzero(where)) == 1)  # contiguous
            found.append((tokens[where], mask[where]))
        assert np.all(tokens[segments == 0] == 0) and np.all(mask[segments == 0] == 0)
    assert len(found) == len(examples)
    for (ids, mask), (want_ids, want_mask) in zip(found, examples, strict=True):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
    with pytest.raises(chat.ChatDataError, match="longer than a packed row"):
        chat.pack(examples, 10)


def test_prompt_tokens_and_other_documents_never_count():
    tokens = np.arange(10)[None]
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    mask = np.array([[0, 0, 1, 1, 0, 0, 0, 1, 0, 0]])
    *_, weights = packed_targets({"tokens": tokens, "segment_ids": segments, "loss_mask": mask})
    # Target t+1 counts when it is an assistant token of the same document as input t.
    np.testing.assert_array_equal(np.asarray(weights[0]), [0, 1, 1, 0, 0, 0, 1, 0, 0])


def test_a_conversation_without_an_assistant_turn_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "1+1"},
                    {"role": "assistant", "content": "2"},
                ]
            }
        )
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2"}]})
        + "\n"
    )
    with pytest.raises(chat.ChatDataError, match=r"bad.jsonl:2: the conversation has no assistant"):
        chat.load_conversations(path)


def test_a_pair_with_identical_responses_is_an_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    prompt = [{"role": "user", "content": "1+1"}]
    path.write_text(json.dumps({"prompt": prompt, "chosen": "2", "rejected": "2"}) + "\n")
    with pytest.raises(
        chat.ChatDataError, match=r"pairs.jsonl:1: chosen and rejected .* identical"
    ):
        chat.load_pairs(path)


def test_reward_is_exact_match_up_to_the_newline():
    problem = Problem(47, 85, 2)
    assert problem.question == "47+85" and problem.answer == "132"
    assert reward("132\n99", problem) == 1.0
    assert reward("133\n", problem) == 0.0
    assert reward("1320", problem) == 0.0


# ---- whole runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    return write_task(out, digits=1, n_corpus=1500, n_sft=200, n_pairs=200, n_heldout=20)


def base_config(task, run_dir, **post):
    import sys

    sys.path.insert(0, "experiments")
    import post_addition

    cfg = post_addition.config()
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, d_model=32, n_layers=1),
        data=dataclasses.replace(cfg.data, corpus=str(task["corpus"])),
        optim=dataclasses.replace(cfg.optim, warmup_steps=2, schedule="constant"),
        train=dataclasses.replace(
            cfg.train,
            steps=6,
            batch_size=8,
            eval_every=0,
            eval_batches=2,
            checkpoint_every=3,
            log_every=1,
            run_dir=str(run_dir),
        ),
        # A given peak: measuring the CPU's would take seconds and is not what is tested.
        log=dataclasses.replace(cfg.log, progress=False, tensorboard=False, peak_flops=1e11),
        post=dataclasses.replace(cfg.post, eval_data="", max_new_tokens=3, **post),
    )
    return validate(cfg)


@pytest.fixture(scope="module")
def pretrained(task, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "pretrain"
    train(base_config(task, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def sft_run(task, pretrained):
    run_dir = pretrained.parent / "sft"
    train(base_config(task, run_dir, mode="sft", data=str(task["sft"]), init_from=str(pretrained)))
    return run_dir


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, cls, batches: int):
    """The run dies while fetching batch ``batches + 1`` (past the step-3 checkpoint)."""
    original = cls.__next__

    def dying(self):
        if self.position >= batches:
            raise Interrupted
        return original(self)

    monkeypatch.setattr(cls, "__next__", dying)


def losses_of(run_dir):
    return {
        step: row["train/loss"]
        for step, row in read_metrics(run_dir).items()
        if "train/loss" in row
    }


@pytest.mark.parametrize(
    "mode",
    [
        "sft",
        pytest.param("dpo", marks=pytest.mark.slow),
        pytest.param("grpo", marks=pytest.mark.slow),
        pytest.param("reward", marks=pytest.mark.slow),
    ],
)
def test_each_mode_resumes_after_an_interruption_with_the_same_losses(
    mode, task, pretrained, sft_run, tmp_path, monkeypatch
):
    settings = {
        "sft": dict(data=str(task["sft"]), init_from=str(pretrained)),
        "dpo": dict(data=str(task["pairs"]), init_from=str(sft_run)),
        "reward": dict(data=str(task["pairs"]), init_from=str(sft_run)),
        "grpo": dict(data=str(task["problems"]), init_from=str(sft_run), group_size=4),
    }[mode]
    if mode == "sft":  # the fixture's run is this mode's uninterrupted run
        straight = sft_run
    else:
        straight = tmp_path / "straight"
        train(base_config(task, straight, mode=mode, **settings))
    cut = base_config(task, tmp_path / "cut", mode=mode, **settings)
    cls = post_data.GroupSamples if mode == "grpo" else post_data.RowBatches
    with monkeypatch.context() as patch:
        interrupt_after(patch, cls, 4)
        with pytest.raises(Interrupted):
            train(cut)
    assert max(losses_of(tmp_path / "cut")) == 4
    train(cut)
    want, got = losses_of(straight), losses_of(tmp_path / "cut")
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose(
        [got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5
    )


def test_dpo_starts_at_its_reference_and_grpo_rewards_its_samples(task, sft_run, tmp_path):
    """Fast twin of the slow resume tests: two steps of each. DPO's policy starts as the
    reference (the SFT run), so the first step has no margin and loss log 2; GRPO logs the
    reward of its samples and the KL to its reference."""
    dpo = base_config(
        task, tmp_path / "dpo", mode="dpo", data=str(task["pairs"]), init_from=str(sft_run)
    )
    train(dataclasses.replace(dpo, train=dataclasses.replace(dpo.train, steps=2)))
    first = read_metrics(tmp_path / "dpo")[1]
    assert abs(first["post/rewards/margin"]) < 1e-4 and abs(first["post/kl"]) < 1e-4
    assert first["train/loss"] == pytest.approx(np.log(2), abs=1e-4)
    grpo = base_config(
        task,
        tmp_path / "grpo",
        mode="grpo",
        data=str(task["problems"]),
        init_from=str(sft_run),
        group_size=4,
        temperature=2.0,
    )
    train(dataclasses.replace(grpo, train=dataclasses.replace(grpo.train, steps=2)))
    rows = read_metrics(tmp_path / "grpo")
    assert 0.0 <= rows[1]["post/reward"] <= 1.0
    assert rows[1]["post/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its reference


def distill_config(task, pretrained, run_dir, **post):
    return base_config(
        task, run_dir, mode="distill", teacher=str(pretrained), distill_alpha=0.0, **post
    )


@pytest.fixture(scope="module")
def distilled_alpha0(task, pretrained):
    run_dir = pretrained.parent / "alpha0"
    train(distill_config(task, pretrained, run_dir))
    return run_dir


def test_distillation_at_alpha_0_is_training_on_hard_labels(pretrained, distilled_alpha0):
    """With no weight on the teacher, distillation is the standard loss: the same losses as
    the pretraining fixture's run, which has this config without post.mode."""
    want, got = losses_of(pretrained), losses_of(distilled_alpha0)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused(task, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    other = base_config(task, teacher)
    other.model.vocab_size = 128
    (teacher / "config.json").write_text(other.to_json())
    cfg = base_config(task, tmp_path / "student", mode="distill", teacher=str(teacher))
    with pytest.raises(ConfigError, match="vocabulary of 128 tokens, this student 96"):
        train(cfg)


def test_cli_bad_chat_data_is_one_error_line(task, tmp_path, capsys, pretrained):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1"}]}) + "\n")
    status = main(
        [
            "train",
            "post_addition",
            "--set",
            f"data.corpus={task['corpus']}",
            "--set",
            "model.d_model=32",
            "--set",
            "model.n_layers=1",
            "--set",
            f"train.run_dir={tmp_path / 'run'}",
            "--set",
            "post.mode=sft",
            "--set",
            f"post.data={bad}",
            "--set",
            f"post.init_from={pretrained}",
        ]
    )
    assert status == 2
    assert "bad.jsonl:1: the conversation has no assistant turn" in capsys.readouterr().err


def test_a_run_saved_before_a_config_key_existed_still_resumes(tmp_path):
    """Runs saved before the post section (or any newer key) read it as its default, so they
    resume; a real change of an identity key is still refused."""
    from research.config import ExperimentConfig
    from research.run.builder import _check_same_run

    cfg = ExperimentConfig().to_dict()
    old = json.loads(json.dumps(cfg))
    del old["post"], old["model"]["qk_norm"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    _check_same_run(tmp_path, cfg)
    cfg["post"]["mode"] = "sft"
    with pytest.raises(ConfigError, match=r"post.mode: None -> 'sft'"):
        _check_same_run(tmp_path, cfg)


def test_reward_model_step_is_bradley_terry_on_the_response_scores(task, pretrained, tmp_path):
    """The first step's loss against a slow reference: each pair of the first batch scored one
    sequence at a time (the logit of token 0 after the response's last token), then
    -log sigmoid(r_chosen - r_rejected) averaged by hand."""
    from flax import nnx

    from research.run import build_run

    cfg = base_config(
        task, tmp_path / "rm", mode="reward", data=str(task["pairs"]), init_from=str(pretrained)
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1))
    train(cfg)
    logged = read_metrics(tmp_path / "rm")[1]
    run = build_run(cfg, "info")
    rows = post_data.pair_rows(str(task["pairs"]), run.data.tokenizer(), cfg.model.seq_len)
    picked = post_data.RowBatches(rows, cfg.train.batch_size, 1, cfg.train.seed, run.mesh)
    from research.post.init import load_params
    from research.train.shardings import abstract_params

    params = load_params(run.config, str(pretrained), abstract_params(run.config.model, run.mesh))
    model = nnx.merge(run.graphdef, params)

    def score(tokens, mask):
        last = int(np.flatnonzero(mask)[-1])  # the closing newline
        return float(model(tokens[None, :last])[0, last - 1, 0])

    losses, right = [], 0
    for i in picked.indices(0):
        margin = score(rows["chosen"][i], rows["chosen_mask"][i]) - score(
            rows["rejected"][i], rows["rejected_mask"][i]
        )
        losses.append(np.log1p(np.exp(-margin)))
        right += margin > 0
    assert logged["train/loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert logged["post/rewards/accuracy"] == pytest.approx(right / len(losses))


@pytest.mark.parametrize("mode", ["sft", pytest.param("dpo", marks=pytest.mark.slow)])
def test_lora_freezes_the_base_trains_only_adapters_and_resumes(
    mode, task, pretrained, tmp_path, monkeypatch, request
):
    """LoRA on SFT (DPO with --runslow): interrupted after its step-3 checkpoint, the resumed
    run has the uninterrupted run's losses; the base stays the starting parameters bit for
    bit; the optimizer holds moments of the adapters only; what eval, generate and export
    read is the merge of base and adapters."""
    import jax

    from research.post import lora
    from research.run import build_run

    start_dir = pretrained if mode == "sft" else request.getfixturevalue("sft_run")
    data = task["sft"] if mode == "sft" else task["pairs"]
    settings = dict(
        mode=mode, data=str(data), init_from=str(start_dir), lora_rank=4, lora_alpha=8.0
    )
    straight = base_config(task, tmp_path / "straight", **settings)
    train(straight)
    cut = base_config(task, tmp_path / "cut", **settings)
    with monkeypatch.context() as patch:
        interrupt_after(patch, post_data.RowBatches, 4)
        with pytest.raises(Interrupted):
            train(cut)
    train(cut)
    want, got = losses_of(tmp_path / "straight"), losses_of(tmp_path / "cut")
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)

    state = build_run(cut, "train").state  # the resumed run's final state (step 6)
    start = build_run(base_config(task, start_dir), "eval").state["params"]
    leaves = jax.tree.leaves
    for x, y in zip(leaves(start), leaves(state["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(np.any(np.asarray(b) != 0) for b in leaves(state["adapters"])[1::2])
    moments = [x for x in leaves(state["opt_state"]) if x.ndim]
    assert sum(x.size for x in moments) == 2 * lora.count(state["adapters"])  # Adam's mu, nu
    # memory.json counts those moments, not a full optimizer's, and the base twice
    report = json.loads((tmp_path / "cut" / "memory.json").read_text())
    adapter_bytes = lora.nbytes(state["adapters"])
    assert 2 * adapter_bytes <= report["optimizer_bytes"] <= 2 * adapter_bytes + 64
    assert report["params_bytes"] == 2 * lora.nbytes(state["base"]) + adapter_bytes
    merged = lora.merge(state["base"], state["adapters"], 8.0 / 4)
    exported = build_run(cut, "generate").state["params"]  # what `research export` writes
    for x, y, z in zip(leaves(merged), leaves(state["params"]), leaves(exported), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(z), np.asarray(y))


def test_cli_lora_target_that_matches_nothing_is_one_error_line(task, tmp_path, capsys):
    status = main(
        [
            "train",
            "post_addition",
            "--set",
            f"data.corpus={task['corpus']}",
            "--set",
            f"train.run_dir={tmp_path / 'run'}",
            "--set",
            "post.lora_rank=4",
            "--set",
            "post.lora_targets=q,attn/wqkv",
            "--set",
            f"post.eval_data={task['heldout']}",  # not the experiment's file under data/
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "error: post.lora_targets: 'attn/wqkv' matches no projection" in err
    assert "attn/wq, attn/wv" in err  # the projections there are
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---- cached top-k teacher logits (research/post/teacher_cache.py) -------------------------

VOCAB = 96  # the task's character vocabulary (base_config resolves model.vocab_size to it)


@pytest.fixture(scope="module")
def full_cache(task, pretrained, tmp_path_factory):
    """The teacher's logits over the whole vocabulary, in float32, for distill_config's run."""
    out = tmp_path_factory.mktemp("cache") / "full"
    cfg = distill_config(task, pretrained, out.parent / "unused", teacher_top_k=VOCAB)
    return write_cache(cfg, out, VOCAB, "float32")


def test_a_cache_of_the_whole_vocabulary_gives_the_online_teachers_kl(
    task,
    pretrained,
    distilled_alpha0,
    full_cache,
    tmp_path,
):
    """At alpha 0 the run follows the hard labels only, so both runs see the same student at
    every step: the KL logged from the cache must be the KL to the teacher run online. (At
    alpha > 0 the gradients are the same function: tests/test_post_losses.py.)"""
    cfg = distill_config(
        task, pretrained, tmp_path / "cached", teacher_logits=str(full_cache), teacher_top_k=VOCAB
    )
    train(cfg)
    want, got = read_metrics(distilled_alpha0), read_metrics(tmp_path / "cached")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for key in ("train/loss", "post/distill/kl"):
        np.testing.assert_allclose(
            [got[s][key] for s in want], [want[s][key] for s in want], rtol=1e-5, atol=1e-7
        )
    assert want[1]["post/distill/kl"] > 0.01  # the student is not its teacher
    manifest = TeacherCache(full_cache).manifest
    assert manifest["k"] == VOCAB and manifest["steps"] == 6 and len(manifest["data_hash"]) == 64


@pytest.mark.slow  # two runs; the fast twin is the test above (one straight run)
def test_a_run_from_a_cache_resumes_with_the_online_teachers_losses(
    task, pretrained, distilled_alpha0, full_cache, tmp_path, monkeypatch
):
    from research.post.teacher_cache import CachedTeacherBatches

    cfg = distill_config(
        task, pretrained, tmp_path / "cut", teacher_logits=str(full_cache), teacher_top_k=VOCAB
    )
    original = CachedTeacherBatches.__next__

    def dying(self):
        if self.step >= 4:  # past the step-3 checkpoint
            raise Interrupted
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(CachedTeacherBatches, "__next__", dying)
        with pytest.raises(Interrupted):
            train(cfg)
    train(cfg)
    want, got = read_metrics(distilled_alpha0), read_metrics(tmp_path / "cut")
    assert sorted(got) == list(range(1, 7))
    for key in ("train/loss", "post/distill/kl"):
        np.testing.assert_allclose(
            [got[s][key] for s in want], [want[s][key] for s in want], rtol=1e-5, atol=1e-7
        )


def _copy(cache, tmp_path, edit=None):
    out = tmp_path / "copy"
    shutil.copytree(cache, out)
    if edit:
        manifest = json.loads((out / "manifest.json").read_text())
        edit(manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


@pytest.mark.parametrize(
    "change,message",
    [
        ("k", "holds the top 96 logits per position, post.teacher_top_k is 32"),
        ("vocab", "vocabulary of 128 tokens, this student 96"),
        ("seed", r"written for other batches \(seed: 0 there, 1 here\)"),
        ("tokens", "step 0 of the cache .* holds logits for other tokens"),
        ("steps", "covers 6 steps, this run trains 8"),
        ("missing", "is not a teacher-logit cache"),
    ],
)
def test_a_cache_that_does_not_belong_to_the_run_is_refused(
    change,
    message,
    task,
    pretrained,
    full_cache,
    tmp_path,
):
    settings = dict(teacher_top_k=VOCAB)
    cache = str(full_cache)
    if change == "k":
        settings = {}
    elif change == "vocab":
        cache = _copy(full_cache, tmp_path, lambda m: m.update(vocab_size=128))
    elif change == "tokens":
        cache = _copy(full_cache, tmp_path)
        shard = dict(np.load(f"{cache}/step_000000.npz"))
        shard["tokens"] = shard["tokens"][:, ::-1]
        np.savez(f"{cache}/step_000000.npz", **shard)
    elif change == "missing":
        cache = str(tmp_path / "nothing")
    cfg = distill_config(task, pretrained, tmp_path / "run", teacher_logits=cache, **settings)
    if change == "seed":
        cfg.train.seed = 1
    elif change == "steps":
        cfg.train.steps = 8
    with pytest.raises(TeacherCacheError, match=message):
        train(cfg)


def test_the_cli_writes_a_cache_and_refuses_an_existing_folder(
    task,
    pretrained,
    tmp_path,
    capsys,
):
    sets = [
        f"data.corpus={task['corpus']}",
        "post.mode=distill",
        f"post.teacher={pretrained}",
        "model.d_model=32",
        "model.n_layers=1",
        "train.steps=2",
        "train.batch_size=8",
        "log.progress=false",
    ]
    args = ["post-teacher-logits", "experiments/post_addition.py", "--out", str(tmp_path / "c")]
    args += [a for s in sets for a in ("--set", s)]
    assert main([*args, "--k", "4", "--dtype", "bfloat16"]) == 0
    cache = TeacherCache(tmp_path / "c")
    assert cache.manifest["k"] == 4 and cache.manifest["dtype"] == "bfloat16"
    shard = cache.read(1)
    assert shard["values"].shape == (1, 8, 32, 4) and shard["ids"].dtype == np.int32
    values = shard["values"].astype(np.float32)
    assert np.all(np.diff(values, axis=-1) <= 0)  # largest first
    assert main(args) == 2
    assert "exists; remove it" in capsys.readouterr().err


# ---- starting from an imported Hugging Face model (research/post/init.py) -----------------

HF_LLAMA = "tests/fixtures/hf/llama3"


def hf_sft_config(tmp_path, run_dir, steps):
    from research.post.init import hf_start

    lines = [("hi", "good day"), ("how", "well")]
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for u, a in lines
        )
    )
    corpus = tmp_path / "corpus.txt"  # only for the data section: val loss is off
    corpus.write_text("hello there good day\n" * 50)
    task = {"corpus": corpus}
    cfg = base_config(task, run_dir, mode="sft", data=str(chat_file))
    cfg = hf_start(cfg, HF_LLAMA)
    cfg.optim.lr = 1e-2
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = steps, 2, 0
    return validate(cfg)


def test_an_hf_start_loads_the_folders_weights_and_tokenizer(tmp_path):
    """Fast twin of the slow run below: the starting parameters are the imported ones, in
    the run's shardings, and post-training data is encoded with the folder's tokenizer."""
    import jax

    from research.config import MeshConfig
    from research.hf.load import load_hf
    from research.parallel.mesh import make_mesh
    from research.post.init import load_params, post_tokenizer
    from research.train.shardings import abstract_params

    cfg = hf_sft_config(tmp_path, tmp_path / "run", steps=4)
    mesh = make_mesh(MeshConfig())
    got = load_params(cfg, HF_LLAMA, abstract_params(cfg.model, mesh))
    want = load_hf(HF_LLAMA).params
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want
    )
    assert post_tokenizer(cfg, None).encode("well\n").tolist() == [54, 36, 74, 0]


@pytest.mark.slow  # two runs with compiles; the fast twin is the test above
def test_sft_from_an_hf_model_starts_at_its_weights_learns_and_resumes(tmp_path):
    """The first step's loss is the imported model's SFT loss on that batch (computed here
    from research.hf.load), the loss falls, and a longer run of the same folder resumes."""
    import jax

    from research.config import MeshConfig
    from research.hf.load import load_hf
    from research.models.loss import packed_targets
    from research.parallel.mesh import make_mesh
    from research.post.losses import sft_loss

    cfg = hf_sft_config(tmp_path, tmp_path / "run", steps=4)
    train(cfg)
    hf = load_hf(HF_LLAMA)
    rows = post_data.sft_rows(cfg.post.data, hf.tokenizer, cfg.model.seq_len)
    source = post_data.RowBatches(rows, 8, 1, cfg.train.seed, make_mesh(MeshConfig()))
    first = {k: v[source.indices(0)] for k, v in rows.items()}
    inputs, targets, segments, weights = packed_targets(jax.tree.map(np.asarray, first))
    want = sft_loss(hf.model()(inputs, segment_ids=segments), targets, weights)
    got = losses_of(tmp_path / "run")
    assert got[1] == pytest.approx(float(want), rel=1e-4)
    assert got[4] < 0.8 * got[1]
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=5))
    train(longer)  # resumes at step 4 (not from the HF weights again)
    resumed = losses_of(tmp_path / "run")
    assert sorted(resumed) == [1, 2, 3, 4, 5] and resumed[5] < 0.8 * got[1]


def test_an_hf_start_with_another_architecture_or_val_loss_is_refused(tmp_path):
    cfg = hf_sft_config(tmp_path, tmp_path / "run", steps=3)
    cfg.model.d_model = 64
    with pytest.raises(
        ConfigError, match=r"another model than this config's: set model.d_model=32"
    ):
        train(cfg)
    cfg = hf_sft_config(tmp_path, tmp_path / "run", steps=3)
    cfg.train.eval_batches, cfg.train.eval_every = 2, 3
    with pytest.raises(ConfigError, match="set train.eval_batches=0"):
        train(cfg)
    cfg = hf_sft_config(tmp_path, tmp_path / "run", steps=3)
    cfg.post.mode, cfg.post.teacher = "distill", HF_LLAMA
    with pytest.raises(ConfigError, match="only post.init_from may be one"):
        train(cfg)


# ---- GRPO's sampler: the batched generator (research/infer/generation.py) -----------------


def test_complete_is_the_greedy_answer_of_a_full_forward_loop_and_stops_at_the_newline():
    """Greedy continuations of ragged prompts from the batched generator against a slow loop
    that re-runs the whole sequence for every token; a sample depends on its seed only."""
    import jax
    from flax import nnx

    from research.config import ModelConfig
    from research.models import Transformer
    from research.post.evaluate import complete

    cfg = ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=1, n_heads=2)
    model = Transformer(cfg.resolved(), nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    prompts = [TOKENIZER.encode(t) for t in ("User: 1+2\nAssistant: ", "User: 12+3\nAs", "U")]
    newline = int(TOKENIZER.encode("\n")[0])
    got = complete(graphdef, params, TOKENIZER, prompts, 6, [0, 0, 0])
    forward = jax.jit(lambda tokens: model(tokens))  # one shape: causal, so right-padding
    for prompt, row in zip(prompts, got, strict=True):  # changes no earlier position
        want, seq = [], list(prompt)
        while len(want) < 6 and newline not in want:
            padded = np.zeros((1, 32), np.int32)
            padded[0, : len(seq)] = seq
            logits = np.asarray(forward(padded)[0, len(seq) - 1, : TOKENIZER.vocab_size])
            want.append(int(np.argmax(logits)))
            seq.append(want[-1])
        assert row.tolist() == want
    # Same shapes (one compile), other neighbours and seeds around the seed-7 request.
    one = complete(graphdef, params, TOKENIZER, prompts, 6, [7, 8, 9], temperature=1.0)
    two = complete(graphdef, params, TOKENIZER, prompts[::-1], 6, [1, 2, 7], temperature=1.0)
    assert one[0].tolist() == two[2].tolist()
