"""Conversations to prompt text through a Jinja chat template: one home for the server's
``/v1/chat/completions`` and the offline ``LLM.chat``, so that both build the same prompt
from the same messages.

The template is, first found: the one given with the request (or to ``LLM.chat``), the
server's ``--chat-template``, the tokenizer's own. ``chat_template_kwargs`` reach the template
as extra variables (``enable_thinking`` for Qwen3, say); they may not replace the arguments
this module sets itself. Every input is bounded: a template's size, the number of extra
variables. Rendering is CPU work that grows with the conversation: the server runs it off
the event loop.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .sampling_params import shorten

#: Longest chat template, in characters (the largest in common checkpoints are a few tens
#: of KiB); also what a request's ``chat_template`` may hold.
MAX_CHAT_TEMPLATE_CHARS = 2**17
#: Most extra template variables one request may give (``chat_template_kwargs``).
MAX_TEMPLATE_KWARGS = 32
#: Arguments of ``apply_chat_template`` (and the template variables it sets) that
#: ``chat_template_kwargs`` may not replace.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


class ChatTemplateError(ValueError):
    """A conversation, template or option that cannot be rendered; ``param`` names the
    request field at fault (the server answers 400 with it)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_template_text(text: str, source: str) -> str:
    """``text`` if it is a Jinja template within :data:`MAX_CHAT_TEMPLATE_CHARS`; else
    ``ValueError`` naming ``source`` (a flag or field)."""
    if len(text) > MAX_CHAT_TEMPLATE_CHARS:
        raise ValueError(
            f"{source}: the chat template has {len(text)} characters, more than the "
            f"{MAX_CHAT_TEMPLATE_CHARS} allowed"
        )
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as error:
        raise ValueError(
            f"{source}: not a valid Jinja template (line {error.lineno}: {error.message})"
        ) from None
    return text


@functools.lru_cache(maxsize=8)
def load_chat_template(value: str) -> str:
    """The template ``--chat-template`` names: the text of the file ``value`` when one
    exists, else ``value`` itself (as vLLM reads the flag). Text without Jinja's braces is
    taken for a path that does not exist. Raises ``ValueError`` naming the flag."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long for a path, or with a NUL byte
        is_file = False
    if is_file:
        size = path.stat().st_size
        if size > 4 * MAX_CHAT_TEMPLATE_CHARS:  # UTF-8: at most four bytes a character
            raise ValueError(f"--chat-template: {shorten(value, 200)} has {size} bytes; too big")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(
                f"--chat-template: cannot read {shorten(value, 200)}: {error}"
            ) from None
        return check_template_text(text, f"--chat-template {shorten(value, 200)}")
    if "{" not in value:
        raise ValueError(
            f"--chat-template: {shorten(value, 200)!r} is neither a file nor a Jinja template"
        )
    return check_template_text(value, "--chat-template")


def message_text(content: Any) -> str:
    """A message's content as text: a string as it is, text content parts joined by
    newlines, no content as the empty string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, Mapping) else None
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(text, str)
            ):
                raise ChatTemplateError(
                    "a content part must be {'type': 'text', 'text': str}", "messages"
                )
            texts.append(text)
        return "\n".join(texts)
    raise ChatTemplateError(
        f"a message's content must be a string or a list of text parts; got {type(content)}",
        "messages",
    )


def check_template_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` as a dict, within :data:`MAX_TEMPLATE_KWARGS` keys and none
    of :data:`RESERVED_TEMPLATE_KWARGS`."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ChatTemplateError(
            "chat_template_kwargs must map names to values", "chat_template_kwargs"
        )
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise ChatTemplateError(
            f"chat_template_kwargs has {len(kwargs)} keys; at most {MAX_TEMPLATE_KWARGS} allowed",
            "chat_template_kwargs",
        )
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ChatTemplateError(
            f"chat_template_kwargs may not set {', '.join(reserved)} (set by the request's own "
            "fields)",
            "chat_template_kwargs",
        )
    return dict(kwargs)


def render_chat(
    tokenizer: Any,
    conversation: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_option: str = "--chat-template",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt text for ``conversation`` (dicts with ``role`` and ``content``, and as
    Hugging Face templates take them ``tool_calls`` with dict arguments, ``tool_call_id``).

    ``chat_template`` (the template text) replaces the tokenizer's; ``template_option``
    names how a caller gives one, for the error when neither exists. ``tools`` (OpenAI's
    ``{"type": "function", "function": {...}}`` dicts) reach the template as ``tools``. With
    ``continue_final_message`` the prompt ends inside the last message, which must be the
    assistant's, so that generation continues it; it excludes ``add_generation_prompt``.
    Raises :class:`ChatTemplateError`."""
    if tokenizer is None:
        raise ChatTemplateError(
            "this model has no tokenizer files, which chat needs; give token ids to "
            "completions instead",
            "messages",
        )
    if not conversation:
        raise ChatTemplateError("messages must not be empty", "messages")
    if not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in conversation):
        raise ChatTemplateError("each message must be a mapping with a string 'role'", "messages")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"this model has no chat template: give one with {template_option} (a Jinja "
            "template or a file holding one), or use completions",
            "messages",
        )
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError(
            "add_generation_prompt and continue_final_message cannot both be true (set "
            "add_generation_prompt to false to continue the final message)",
            "continue_final_message",
        )
    if continue_final_message and conversation[-1]["role"] != "assistant":
        raise ChatTemplateError(
            "continue_final_message needs the last message to be the assistant's",
            "continue_final_message",
        )
    kwargs = check_template_kwargs(chat_template_kwargs)
    messages = [{**m, "content": message_text(m.get("content"))} for m in conversation]
    try:
        prompt = tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **({"tools": [dict(tool) for tool in tools]} if tools else {}),
            **kwargs,
        )
    except Exception as error:  # a template may reject any conversation
        raise ChatTemplateError(
            f"the chat template rejected the messages: {shorten(str(error), 500)}", "messages"
        ) from None
    if not isinstance(prompt, str):
        raise ChatTemplateError("the chat template did not render to text", "messages")
    return prompt


def as_conversations(messages: Any) -> list[list[Mapping[str, Any]]]:
    """One conversation (a list of message dicts) or a list of conversations, as a list of
    conversations (as vLLM's ``LLM.chat`` takes them)."""
    if isinstance(messages, (list, tuple)) and messages:
        if all(isinstance(m, Mapping) for m in messages):
            return [list(messages)]
        if all(isinstance(c, (list, tuple)) for c in messages):
            return [list(c) for c in messages]
    raise ValueError(
        "messages must be a conversation (a non-empty list of message dicts) or a list of them"
    )
