"""The token ids of a session's next turn: its stored history plus only the new tokens.

The chat template renders the whole conversation; when the stored history decodes to a
prefix of that rendering, the turn's prompt is ``history + tokenize(rest)``, so every
history token (and its KV) is reused exactly. Otherwise (a stop string cut the text, a
tokenizer that does not round-trip) the rendering is tokenized afresh and the prefix cache
reuses whatever full blocks still match.
"""

from __future__ import annotations

from typing import Any

from tools.render import apply_chat_template_with_tools


def render_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> str:
    """The chat template's text for ``messages`` (with ``tools`` presented the model's way),
    ending with the assistant prompt."""
    return apply_chat_template_with_tools(tokenizer, messages, tools or None)


def turn_prompt(
    tokenizer: Any,
    history_ids: list[int],
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Prompt token ids for generating the next assistant message of ``messages``."""
    rendered = render_conversation(tokenizer, messages, tools)
    if history_ids:
        history_text = tokenizer.decode(
            history_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if rendered.startswith(history_text) and len(rendered) > len(history_text):
            rest = tokenizer.encode(rendered[len(history_text) :], add_special_tokens=False)
            return [*history_ids, *rest]
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def common_prefix_len(a: list[int], b: list[int]) -> int:
    num = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        num += 1
    return num
