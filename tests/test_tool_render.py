"""Rendering tools into prompts: SmolLM2's template (no tools) and a tools-aware template."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from engine.model_loader import load_model
from tests.tool_parsing import parse_tool_calls
from tools.render import (
    TOOL_RESULTS_NOTE,
    ToolSchemaError,
    apply_chat_template_with_tools,
    prepare_tool_prompt,
    template_renders_tool_results,
    template_renders_tool_turns,
    template_renders_tools,
    tool_call_format,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "18C sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "22C"}]},
]
# A Qwen2.5-like template that renders tools, tool calls and tool results itself.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_model(None).tokenizer


@pytest.fixture(scope="module")
def tools_tokenizer(tokenizer: Any) -> Any:
    aware = copy.copy(tokenizer)
    aware.chat_template = TOOLS_TEMPLATE
    return aware


class FakeTokenizer:
    def __init__(self, chat_template: str, vocab: dict[str, int]) -> None:
        self.chat_template = chat_template
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_tool_call_format_from_vocabulary_and_template(tokenizer: Any) -> None:
    assert tool_call_format(tokenizer) == "hermes"
    assert tool_call_format(FakeTokenizer("", {"[TOOL_CALLS]": 5})) == "mistral"
    assert tool_call_format(FakeTokenizer("", {"<|python_tag|>": 7})) == "llama3_json"
    llama3 = "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' }}{{ '<|eot_id|>' }}"
    assert tool_call_format(FakeTokenizer(llama3, {})) == "llama3_json"


def test_smollm2_template_does_not_render_tools(tokenizer: Any) -> None:
    assert not template_renders_tools(tokenizer)
    assert not template_renders_tool_turns(tokenizer)


def test_tools_go_into_a_hermes_system_block(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    rendered = prepare_tool_prompt(tokenizer, messages, [WEATHER_TOOL]).messages
    assert rendered[1:] == messages and rendered[0]["role"] == "system"
    system = rendered[0]["content"]
    schemas = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(schemas) == WEATHER_TOOL
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' in system
    prompt = apply_chat_template_with_tools(tokenizer, messages, [WEATHER_TOOL])
    assert prompt.startswith("<|im_start|>system\n# Tools")
    assert prompt.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert messages == [{"role": "user", "content": "Weather in Paris?"}]  # input untouched


def test_existing_system_message_keeps_its_text(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    rendered = prepare_tool_prompt(tokenizer, messages, [WEATHER_TOOL]).messages
    assert len(rendered) == 2 and rendered[0]["content"].startswith("Be terse.\n\n# Tools")
    assert messages[0]["content"] == "Be terse."


def test_no_tools_changes_nothing(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert prepare_tool_prompt(tokenizer, messages, None) == (messages, None)
    assert prepare_tool_prompt(tokenizer, messages, []) == (messages, None)


def test_tool_calls_and_results_become_hermes_text(tokenizer: Any) -> None:
    """SmolLM2's template renders any role: the results stay one ``tool`` turn (item 8)."""
    assert template_renders_tool_results(tokenizer)
    rendered = prepare_tool_prompt(tokenizer, CONVERSATION, [WEATHER_TOOL]).messages
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "tool"]
    assistant = rendered[2]["content"]
    assert assistant.startswith("Checking.\n<tool_call>\n")
    parsed = parse_tool_calls(assistant, "hermes")  # what we render is what the parser reads back
    assert parsed.text == "Checking."
    assert [json.loads(c.arguments_json)["city"] for c in parsed.tool_calls] == ["Paris", "Rome"]
    responses = rendered[3]["content"].split("\n</tool_response>\n")
    assert len(responses) == 3 and responses[2] == TOOL_RESULTS_NOTE
    assert json.loads(responses[0].removeprefix("<tool_response>\n")) == {
        "name": "get_weather",
        "content": "18C sunny",
    }
    assert '{"name": "get_weather", "content": "22C"}' in responses[1]
    prompt = apply_chat_template_with_tools(tokenizer, CONVERSATION, [WEATHER_TOOL])
    assert "<|im_start|>tool\n<tool_response>" in prompt


def test_a_template_without_a_tool_role_gets_results_in_a_user_turn(tokenizer: Any) -> None:
    strict = copy.copy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    assert not template_renders_tool_results(strict)
    rendered = prepare_tool_prompt(strict, CONVERSATION, [WEATHER_TOOL]).messages
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[3]["content"].startswith("<tool_response>\n")
    assert rendered[3]["content"].endswith(TOOL_RESULTS_NOTE)


def test_tools_aware_template_gets_tools_and_turns_as_is(tools_tokenizer: Any) -> None:
    assert template_renders_tools(tools_tokenizer)
    assert template_renders_tool_turns(tools_tokenizer)
    prompt = prepare_tool_prompt(tools_tokenizer, CONVERSATION, [WEATHER_TOOL])
    assert prompt.messages == CONVERSATION and prompt.template_tools == [WEATHER_TOOL]
    text = apply_chat_template_with_tools(tools_tokenizer, CONVERSATION, [WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\nTOOLS:")
    assert "<call>get_weather</call><call>get_weather</call>" in text
    assert "<|im_start|>tool\n18C sunny" in text


@pytest.mark.parametrize(
    "bad_tools",
    [
        [{"type": "function"}],
        [{"type": "retrieval", "function": {"name": "x"}}],
        [{"type": "function", "function": {"name": ""}}],
        ["get_weather"],
    ],
)
def test_invalid_tool_schemas_raise(tokenizer: Any, bad_tools: list[Any]) -> None:
    with pytest.raises(ToolSchemaError):
        prepare_tool_prompt(tokenizer, [{"role": "user", "content": "x"}], bad_tools)
