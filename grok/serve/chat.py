"""Chat templates: Grok-1 is a base model, so /v1/chat/completions needs a template given at
start-up (`--chat-template FILE`) that turns messages into one prompt.

Templates are Jinja, rendered as Hugging Face's `apply_chat_template` renders them (a
sandbox, `trim_blocks` and `lstrip_blocks`, `raise_exception`, `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`), so templates written for it work here.
A file is either the template itself or a JSON tokenizer config holding `chat_template`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from grok.errors import GrokError
from grok.serve.protocol import Message


class TemplateError(GrokError):
    """The template refused the messages (its `raise_exception`) or failed on them."""


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise GrokError(f"chat template: {e.message} (line {e.lineno})") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_file(cls, path: str | os.PathLike, bos_token: str = "",
                  eos_token: str = "") -> ChatTemplate:
        try:
            text = open(path, encoding="utf-8").read()  # noqa: SIM115 (read at once)
        except OSError as e:
            raise GrokError(f"--chat-template {os.fspath(path)!r}: {e.strerror}") from None
        if os.fspath(path).endswith(".json"):
            try:
                text = json.loads(text)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise GrokError(f"--chat-template {os.fspath(path)!r}: a JSON file must hold "
                                f"a string \"chat_template\"") from None
            if not isinstance(text, str):
                raise GrokError(f"--chat-template {os.fspath(path)!r}: chat_template must "
                                f"be a string")
        return cls(text, bos_token, eos_token)

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt for `messages`; a `TemplateError` (a 400) when the template rejects
        them."""
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(f"the chat template failed on these messages: {e}") from None
