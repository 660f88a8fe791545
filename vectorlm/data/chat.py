"""Chat data: rendering conversations with a chat template and finding the assistant turns in the result."""

from __future__ import annotations

from typing import Any

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


def render_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, template: str | None, where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character span of every assistant turn in it.

    A turn's span is what rendering the conversation up to and including it adds to rendering it up to the turn's
    generation prompt: the reply and the template's end-of-turn markup, which the model must learn to emit. This
    works for any template that renders a conversation's prefix as a prefix of the whole (most do); one that does not
    (e.g. it rewrites earlier turns) is reported rather than trained on wrongly.
    """

    def render(part: list[dict[str, str]], *, prompt: bool) -> str:
        return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False, add_generation_prompt=prompt)

    text = render(messages, prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], prompt=True), render(messages[: index + 1], prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template does not render this conversation's turns as prefixes of "
                            "the whole, so the assistant turns cannot be located; use a template that does "
                            "(data.chat_template)")  # fmt: skip
        spans.append((len(before), len(through)))
    return text, spans
