"""Chat templates from a tokenizer folder (research/post/templates.py): renderings of a ChatML
and the Llama 3 template against strings written by hand, and assistant masks (by prefixes and
by {% generation %} markers) against the characters they should cover."""

import json

import numpy as np
import pytest

from research.data.tokenizer import BPETokenizer
from research.post.templates import ChatTemplate, ChatTemplateError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# ChatML with transformers' {% generation %} markers around what the assistant is trained on.
CHATML_MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
)
TALK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "good day"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def tokenizer() -> BPETokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|begin_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["good day hi Be brief. user assistant system"] * 5, trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return BPETokenizer(tok)


def decode(tok, ids) -> str:
    return tok._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_chatml_renders_as_written_by_hand():
    template = ChatTemplate(CHATML)
    assert template.render(TALK[:3]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\ngood day<|im_end|>\n"
    )
    assert template.render(TALK[1:2], add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_renders_as_written_by_hand(tmp_path):
    config = {"chat_template": LLAMA3, "bos_token": {"content": "<|begin_of_text|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.from_folder(tmp_path)
    assert template.render(TALK[1:3]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ngood day<|eot_id|>"
    )
    assert template.render(TALK[1:2], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize(
    "source,trained",
    [
        (CHATML, ["good day<|im_end|>\n", "4<|im_end|>\n"]),  # by prefixes
        (LLAMA3, ["good day<|eot_id|>", "4<|eot_id|>"]),  # by prefixes
        (CHATML_MARKED, ["good day<|im_end|>", "4<|im_end|>"]),  # by markers
    ],
    ids=["chatml", "llama3", "marked"],
)
def test_the_mask_covers_exactly_the_assistants_text(source, trained):
    template = ChatTemplate(source, bos_token="<|begin_of_text|>")
    text, spans = template.assistant_spans(TALK)
    assert text == template.render(TALK)
    assert [text[a:b] for a, b in spans] == trained
    tok = tokenizer()
    ids, mask = template.encode(tok, TALK)
    assert decode(tok, ids) == text  # nothing lost in tokenizing
    # Each run of masked tokens decodes to one assistant span (the spans hold no merges
    # across their edges with this tokenizer's vocabulary).
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(mask)) + 1)
    masked = [decode(tok, ids[r]) for r in runs if mask[r[0]]]
    assert masked == trained


def test_a_template_that_is_not_prefix_stable_or_missing_is_an_error(tmp_path):
    counting = ChatTemplate(
        "{{ messages | length }}:{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="add \\{% generation %\\} markers"):
        counting.assistant_spans(TALK[1:3])
    with pytest.raises(ChatTemplateError, match="no tokenizer_config.json"):
        ChatTemplate.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ChatTemplateError, match="has no chat_template"):
        ChatTemplate.from_folder(tmp_path)
    refusing = ChatTemplate("{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(ChatTemplateError, match="refused the conversation: only user"):
        refusing.render(TALK)


def test_sft_rows_use_the_configured_template(tmp_path):
    from research.config import ExperimentConfig
    from research.post import data as post_data
    from research.post.setup import chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    cfg = ExperimentConfig()
    cfg.post.chat_template = str(tmp_path)
    template = chat_template(cfg)
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text(json.dumps({"messages": TALK}) + "\n")
    tok = tokenizer()
    rows = post_data.sft_rows(str(chat_file), tok, 127, template)
    ids, mask = template.encode(tok, TALK)
    np.testing.assert_array_equal(rows["tokens"][0, : len(ids)], ids)
    np.testing.assert_array_equal(rows["loss_mask"][0, : len(ids)], mask)
    cfg.post.chat_template = "tokenizer"
    with pytest.raises(ChatTemplateError, match="post.init_from is not one"):
        chat_template(cfg)


@pytest.mark.parametrize(
    "source,stop",
    [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>"), (CHATML_MARKED, "<|im_end|>")],
    ids=["chatml", "llama3", "marked"],
)
def test_generation_prompts_and_stop_tokens_come_from_the_template(source, stop):
    from research.post.evaluate import answer_text, encode_prompts, stop_token
    from research.post.task import Problem

    template, tok = ChatTemplate(source, bos_token="<|begin_of_text|>"), tokenizer()
    problem = Problem(12, 30, 2)
    (ids,) = encode_prompts(tok, [problem], template)
    assert decode(tok, ids) == template.render(problem.messages(), add_generation_prompt=True)
    eot = stop_token(tok, template)
    assert eot == tok._tok.token_to_id(stop)
    answer = np.asarray([*tok.encode("42"), eot])
    assert answer_text(tok, answer, eot) == "42"
