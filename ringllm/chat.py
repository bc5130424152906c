"""Chat prompts: a model's Jinja chat template rendered the way Hugging Face transformers does.

A GGUF without ``tokenizer.chat_template`` gets its family's standard template from
:func:`default_template`: Gemma's turn format when the vocabulary has ``<start_of_turn>`` and
``<end_of_turn>`` (the gemma-3-270m GGUF is a base model and ships none), else ChatML.

Same environment as ``transformers`` (``_compile_jinja_template``): a sandboxed, immutable
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
a ``tojson`` filter that keeps non-ASCII text, the ``raise_exception`` and ``strftime_now``
globals, and a ``{% generation %}`` block that just renders its body. Templates see
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra keyword.
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ringllm.errors import ModelError, RequestError

# Used when a model ships no template: ChatML, which SmolLM2 and Qwen also use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Gemma 2/3's turn format (google/gemma-3-*-it): the template writes <bos> itself, so encode
# its output without adding another BOS; "assistant" is written "model"; Gemma has no system
# role: a system message is put before the first user turn's text, followed by a blank line;
# each message's content is stripped of surrounding whitespace; roles must alternate.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set first = messages[0] if messages else none %}"
    "{% if first is not none and first['role'] == 'system' %}"
    "{% set prefix = first['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('Gemma conversation roles must alternate user/assistant/user/... after an optional system message') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def default_template(vocabulary: Container[str]) -> str:
    """The standard template of the model family whose `vocabulary` (token texts) this is."""
    if "<start_of_turn>" in vocabulary and "<end_of_turn>" in vocabulary:
        return GEMMA_TEMPLATE
    return CHATML_TEMPLATE


class _TemplateRaised(Exception):
    """raise_exception() called by a template: it refuses the messages it was given."""


class _GenerationBlock(Extension):
    # transformers tracks assistant spans with {% generation %}; we only need it to parse.
    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(f"chat template does not compile: {exc.message} (template line {exc.lineno})") from None


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                **kw: Any) -> str:
    """Render `messages` (mappings with a string ``role``) with a Jinja chat `template`.

    `template` None means :data:`CHATML_TEMPLATE`. Raises :class:`RequestError` when the
    messages are malformed or the template refuses them via ``raise_exception`` (e.g. roles
    that do not alternate), and :class:`ModelError` when the template does not compile or
    fails while rendering.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise RequestError(f"messages must be a list of objects with a 'role', got {type(messages).__name__}")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{k}] must be an object with a string 'role', got {m!r}")
    compiled = _compile(CHATML_TEMPLATE if template is None else template)
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **kw)
    except _TemplateRaised as exc:
        raise RequestError(f"the chat template refused the messages: {exc}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise ModelError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None
