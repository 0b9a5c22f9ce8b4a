"""Chat prompts from the model's own Jinja template (GGUF `tokenizer.chat_template`), sandboxed.

The template comes from a file the operator chose, but it is still code: it runs in Jinja's immutable
sandbox, and a template error becomes a 400 naming the template, never a traceback.
"""

from __future__ import annotations

import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import BadRequest

__all__ = ["render_chat", "FALLBACK_TEMPLATE"]

# ChatML, used when a model carries no template of its own.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str):
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    bos_token: str,
    eos_token: str,
    now: datetime.datetime | None = None,
) -> str:
    """Render messages into the prompt text the model was trained on, ready for generation."""
    when = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        return _compile(template or FALLBACK_TEMPLATE).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
            strftime_now=when.strftime,
        )
    except jinja2.TemplateError as e:
        raise BadRequest(f"messages: the model's chat template rejected them: {e.message}", param="messages") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        raise BadRequest("messages: the model's chat template could not render them", param="messages") from None
