"""Chat templates from a tokenizer folder: ``tokenizer_config.json``'s ``chat_template`` (Jinja),
rendered in jinja2's sandboxed environment as transformers does (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, ``tojson``; ``bos_token`` and
``eos_token`` from the same file), with assistant-only loss masks.

The mask marks the characters of the assistant turns, found one of two ways:

- the template wraps them in ``{% generation %}...{% endgeneration %}`` (transformers'
  ``return_assistant_tokens_mask`` convention): exactly what those blocks render;
- otherwise, by rendering prefix by prefix: for each assistant turn i, the conversation before
  it with the generation prompt (``add_generation_prompt=True``) is a prefix P of the
  conversation up to and with turn i; the turn's span is what follows P (its content and the
  template's end-of-turn text, as our own template trains the closing newline). A template
  whose renderings are not prefixes of each other cannot be masked this way: an error.

A token is trained when its first character is in a span (offsets from HF ``tokenizers``).
Our own plain template (research/post/chat.py) stays the default for our tokenizers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from research.post.chat import ChatDataError

_START, _END = "\x00<gen>\x00", "\x00</gen>\x00"  # markers no text contains (stripped after)


class ChatTemplateError(ChatDataError):
    """A chat template that cannot be read, rendered or masked; the message names the fix."""


def _environment():
    try:
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError(
            "chat templates need jinja2: pip install 'research[post]' (or jinja2)"
        ) from None

    class Generation(Extension):
        """``{% generation %}body{% endgeneration %}``: the body, between markers."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_mark", [])
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _START + caller() + _END

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation]
    )
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class ChatTemplate:
    """A Jinja chat template with the special tokens it may refer to."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError

        self.source = source
        self.tokens = {"bos_token": bos_token, "eos_token": eos_token}
        try:
            self.template = _environment().from_string(source)
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template is not valid Jinja: {error}") from None
        self.marked = re.search(r"{%-?\s*generation\s*-?%}", source) is not None

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        """The template of a tokenizer folder's tokenizer_config.json (the ``default`` one when
        it lists several)."""
        path = Path(folder) / "tokenizer_config.json"
        if not path.is_file():
            raise ChatTemplateError(
                f"{folder} has no tokenizer_config.json, so no chat template; use our own "
                "(post.chat_template='') or a folder that has one"
            )
        config = json.loads(path.read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        if not isinstance(template, str) or not template:
            raise ChatTemplateError(
                f"{path} has no chat_template (a Jinja string); use our own template "
                "(post.chat_template='')"
            )
        return cls(
            template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        )

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens
            )
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template failed to render: {error}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation's text (with the assistant's generation prompt if asked)."""
        return self._render(messages, add_generation_prompt).replace(_START, "").replace(_END, "")

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) character spans of the assistant turns])."""
        if self.marked:
            raw, text, spans = self._render(messages, False), "", []
            for i, piece in enumerate(raw.split(_START)):
                if i == 0:
                    text += piece
                    continue
                inside, _, after = piece.partition(_END)
                spans.append((len(text), len(text) + len(inside)))
                text += inside + after
            return text, spans
        text, spans = self.render(messages), []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ChatTemplateError(
                    "the chat template does not render a conversation as a prefix of its "
                    f"continuation (turn {i}), so assistant masks cannot be derived by "
                    "prefixes; add {% generation %} markers around the assistant's text"
                )
            spans.append((len(before), len(upto)))
        return text, spans

    def encode(self, tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, mask) like research/post/chat.encode: mask 1 on assistant tokens."""
        text, spans = self.assistant_spans(messages)
        encoding = tokenizer._tok.encode(text, add_special_tokens=False)
        inside = np.zeros(len(text) + 1, bool)
        for start, end in spans:
            inside[start:end] = True
        mask = [int(inside[start]) if end > start else 0 for start, end in encoding.offsets]
        return np.asarray(encoding.ids, np.int32), np.asarray(mask, np.int32)

    def prompt_ids(self, tokenizer, messages: list[dict]) -> np.ndarray:
        """The conversation so far, with the generation prompt, as ids (generation input)."""
        text = self.render(messages, add_generation_prompt=True)
        return np.asarray(tokenizer._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def end_of_turn(self, tokenizer) -> int:
        """The first token the template writes after an assistant's text: generation's stop
        token (ChatML's <|im_end|>, Llama 3's <|eot_id|>)."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        text, spans = self.assistant_spans(probe)
        start, end = spans[-1]
        tail = text[start:end].split("y", 1)[-1] or text[end:]
        ids = tokenizer._tok.encode(tail, add_special_tokens=False).ids
        if not ids:
            raise ChatTemplateError(
                "the chat template writes nothing after the assistant's text, so generation "
                "has no stop token; use a template with an end-of-turn token"
            )
        return int(ids[0])
