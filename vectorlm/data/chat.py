"""Chat data: rendering conversations with a chat template and finding the assistant turns in the result."""

from __future__ import annotations

from typing import Any, NamedTuple

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from vectorlm.data.sources import DataError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Any, *, where: str) -> list[dict[str, str]]:
    """``messages`` as a list of {role, content}, or a DataError naming the row and the problem."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}}, got {messages!r:.60}")
    for turn, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {turn} needs a string 'content', got {message!r:.60}")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: message {turn} has unknown role {message.get('role')!r} "
                            f"(expected {', '.join(ROLES)})")  # fmt: skip
    return messages


class RenderedChat(NamedTuple):
    text: str
    assistant_spans: list[tuple[int, int]]  # the character spans that carry the loss
    untrained_turns: int  # assistant turns that open the conversation: no prompt to learn them from


def render_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, template: str | None, where: str
) -> RenderedChat:
    """The conversation as text and the character span of every assistant turn in it.

    A turn's span is what rendering the conversation up to and including it adds to rendering it up to the turn's
    generation prompt: the reply and the template's end-of-turn markup, which the model must learn to emit. This
    works for any template that renders a conversation's prefix as a prefix of the whole (most do); one that does not
    (e.g. it rewrites earlier turns) is reported rather than trained on wrongly. An assistant turn that opens the
    conversation has no prompt to render before it: it stays context, counted in ``untrained_turns``.
    """

    def render(part: list[dict[str, str]], *, prompt: bool) -> str:
        try:
            return _render(tokenizer, part, template=template, prompt=prompt)
        except TemplateError as error:  # a syntax error, or one the template raises (raise_exception)
            whose = "data.chat_template" if template is not None else "the tokenizer's chat template"
            raise DataError(f"{where}: {whose} cannot render this conversation: {type(error).__name__}: "
                            f"{error}") from error  # fmt: skip

    text = render(messages, prompt=False)
    spans, untrained = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            untrained += 1
            continue
        before, through = render(messages[:index], prompt=True), render(messages[: index + 1], prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template does not render this conversation's turns as prefixes of "
                            "the whole, so the assistant turns cannot be located; use a template that does "
                            "(data.chat_template)")  # fmt: skip
        spans.append((len(before), len(through)))
    return RenderedChat(text, spans, untrained)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, template: str | None,
            prompt: bool) -> str:  # fmt: skip
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=prompt)


def content_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], indices: list[int], *, template: str | None,
    text: str,
) -> list[tuple[int, int]] | None:  # fmt: skip
    """The character spans of the contents of ``messages[indices]`` in their rendered ``text``, or None where one
    cannot be located for certain.

    Each content is searched within its own turn: what rendering the conversation through the message adds to
    rendering it before the message. A search from the start could find the same characters in the template's markup
    or an earlier turn (an assistant reply "</s>" would match the end-of-turn markup after the user's turn). None
    when the template does not render prefixes as prefixes, or changes the content (e.g. strips it).
    """
    spans = []
    for index in indices:
        try:
            before = _render(tokenizer, messages[:index], template=template, prompt=False) if index else ""
            through = _render(tokenizer, messages[: index + 1], template=template, prompt=False)
        except (ValueError, TemplateError):  # a template that refuses a prefix (e.g. one ending without a user turn)
            return None
        if not (through.startswith(before) and text.startswith(through)):
            return None
        content = messages[index]["content"]
        at = text.find(content, len(before), len(through))
        if at < 0:
            return None
        spans.append((at, at + len(content)))
    return spans
