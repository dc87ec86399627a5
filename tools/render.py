"""Put tool schemas, tool calls and tool results into a chat prompt, the model's way if it has one.

- ``tool_call_format(tokenizer)``: which convention the model writes calls in (mistral when
  the vocabulary or template has ``[TOOL_CALLS]``, llama3_json for ``<|python_tag|>`` or a
  Llama-3 template, else hermes).
- ``prepare_tool_prompt(tokenizer, messages, tools)``: when the chat template renders
  ``tools=`` (measured: rendering with and without a probe tool differs), the messages are
  passed through and the tools go to the template; otherwise the tools are written into the
  system message as a Hermes block (JSON schemas inside ``<tools></tools>``, answer with
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``). Likewise, when the template
  cannot render assistant ``tool_calls`` and ``tool`` results, they are rewritten as text in
  the Hermes convention: ``<tool_call>`` in the assistant turn, and consecutive results as one
  turn of ``<tool_response>`` blocks followed by ``TOOL_RESULTS_NOTE``. That turn keeps the
  ``tool`` role when the template renders a ``tool`` message's content (a generic role, as
  SmolLM2's ChatML template does: Hermes-2-Pro's own layout), else it is a user turn. Measured
  on SmolLM2-135M: a user turn of ``<tool_response>`` blocks, with or without the note, is
  parroted back; the ``tool`` turn with the note is answered from the result.

Invalid tool schemas raise ``ToolSchemaError`` (an ``InvalidRequestError``, the one class the
grammar builder raises too); the input lists are never modified.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, NamedTuple

from tools.json_schema_grammar import ToolSchemaError
from tools.tool_call import ToolCallFormat

PROBE_TOOL_NAME = "tarry_probe_tool_4c1e"
PROBE_RESULT = "tarry_probe_result_9b2d"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": PROBE_TOOL_NAME,
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
PROBE_TOOL_TURNS: list[dict[str, Any]] = [
    {"role": "user", "content": "probe"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_probe",
                "type": "function",
                "function": {"name": PROBE_TOOL_NAME, "arguments": "{}"},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_probe", "content": PROBE_RESULT},
]
TOOL_RESULTS_NOTE = "Answer the user's question with these results."
PROBE_RESULT_TURNS: list[dict[str, Any]] = [
    {"role": "user", "content": "probe"},
    {"role": "assistant", "content": "probe"},
    {"role": "tool", "tool_call_id": "call_probe", "content": PROBE_RESULT},
]
HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{schemas}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class ToolPrompt(NamedTuple):
    messages: list[dict[str, Any]]  # pass to apply_chat_template
    template_tools: list[dict[str, Any]] | None  # pass as tools= (None: already in messages)


def chat_template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        return "\n".join(str(value) for value in template.values())
    return str(template)


def tool_call_format(tokenizer: Any) -> ToolCallFormat:
    """The convention this model writes tool calls in (see the module docstring)."""
    template = chat_template_text(tokenizer)
    vocab = tokenizer.get_vocab()
    if "[TOOL_CALLS]" in vocab or "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in vocab or "<|python_tag|>" in template:
        return "llama3_json"
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama3_json"
    return "hermes"


def render_template(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str | None:
    """The template's text for ``messages``, or None when the template fails on them."""
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 - any template error means "not supported"
        return None
    return rendered if isinstance(rendered, str) else None


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders ``tools=`` (with and without them differ)."""
    messages = [{"role": "user", "content": "probe"}]
    with_tools = render_template(tokenizer, messages, tools=PROBE_TOOLS)
    return with_tools is not None and with_tools != render_template(tokenizer, messages)


def template_renders_tool_turns(tokenizer: Any) -> bool:
    """Whether the template renders assistant ``tool_calls`` and ``tool`` results itself."""
    rendered = render_template(tokenizer, PROBE_TOOL_TURNS, tools=PROBE_TOOLS)
    return rendered is not None and PROBE_TOOL_NAME in rendered and PROBE_RESULT in rendered


def template_renders_tool_results(tokenizer: Any) -> bool:
    """Whether the template renders a ``tool`` message's content (natively or as a generic
    role), after an assistant turn of plain text."""
    rendered = render_template(tokenizer, PROBE_RESULT_TURNS)
    return rendered is not None and PROBE_RESULT in rendered


def validate_tools(tools: list[dict[str, Any]]) -> None:
    for tool_idx, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ToolSchemaError(f"tools[{tool_idx}] must be {{'type': 'function', ...}}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolSchemaError(f"tools[{tool_idx}] must be {{'type': 'function', ...}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolSchemaError(f"tools[{tool_idx}].function.name must be a non-empty string")


def hermes_tools_block(tools: list[dict[str, Any]]) -> str:
    schemas = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return HERMES_TOOLS_PROMPT.format(schemas=schemas)


def add_tools_to_system_message(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    block = hermes_tools_block(tools)
    if messages and messages[0].get("role") == "system":
        system = dict(messages[0])
        system["content"] = f"{text_content(system.get('content'))}\n\n{block}"
        return [system, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def text_content(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI content list."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def hermes_tool_call_text(tool_call: dict[str, Any]) -> str:
    function = tool_call.get("function", {})
    arguments: Any = function.get("arguments", "{}")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # else shown as the string the client sent
            arguments = json.loads(arguments)
    payload = {"name": function.get("name", ""), "arguments": arguments}
    return f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>"


def tool_turns_as_text(
    messages: list[dict[str, Any]], results_role: str = "user"
) -> list[dict[str, Any]]:
    """Assistant ``tool_calls`` and ``tool`` results rewritten as Hermes-convention text.

    Consecutive tool results become one ``results_role`` turn of ``<tool_response>`` blocks,
    each naming the function its ``tool_call_id`` answered, then ``TOOL_RESULTS_NOTE``.
    """
    call_names: dict[str, str] = {}
    rewritten: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [text_content(message.get("content"))] if message.get("content") else []
            for tool_call in message["tool_calls"]:
                call_names[str(tool_call.get("id"))] = tool_call.get("function", {}).get("name")
                parts.append(hermes_tool_call_text(tool_call))
            rewritten.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            name = message.get("name") or call_names.get(str(message.get("tool_call_id")))
            payload = {"name": name, "content": text_content(message.get("content"))}
            response = (
                f"<tool_response>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_response>"
            )
            if rewritten and rewritten[-1].get("tool_responses"):
                rewritten[-1]["tool_responses"].append(response)
            else:
                rewritten.append({"role": results_role, "tool_responses": [response]})
        else:
            rewritten.append(message)
    return [_with_results_text(m) for m in rewritten]


def _with_results_text(message: dict[str, Any]) -> dict[str, Any]:
    responses = message.get("tool_responses")
    if responses is None:
        return message
    return {"role": message["role"], "content": "\n".join([*responses, TOOL_RESULTS_NOTE])}


def prepare_tool_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> ToolPrompt:
    """Messages (and tools for the template) that present ``tools`` the model's way."""
    tools = tools or []
    validate_tools(tools)
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if has_tool_turns and not template_renders_tool_turns(tokenizer):
        results_role = "tool" if template_renders_tool_results(tokenizer) else "user"
        messages = tool_turns_as_text(messages, results_role)
    if not tools:
        return ToolPrompt(list(messages), None)
    if template_renders_tools(tokenizer):
        return ToolPrompt(list(messages), tools)
    return ToolPrompt(add_tools_to_system_message(messages, tools), None)


def apply_chat_template_with_tools(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for ``messages`` with ``tools``, rendered the model's way."""
    prompt = prepare_tool_prompt(tokenizer, messages, tools)
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if prompt.template_tools is not None:
        kwargs["tools"] = prompt.template_tools
    rendered = tokenizer.apply_chat_template(prompt.messages, tokenize=False, **kwargs)
    return str(rendered)
