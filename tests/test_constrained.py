"""Forced tool calls: the schema grammar alone, the sampler hook, and SmolLM2 through the engine."""

from __future__ import annotations

import time

import jsonschema
import pytest
import torch
import xgrammar as xgr

from engine.llm_engine import merge_outputs
from engine.outputs import RequestOutput
from engine.sampler import SamplingRow, sample
from engine.sampling_params import SamplingParams
from tests.helpers import make_engine
from tools.constrained import (
    FunctionSpec,
    JsonAnswer,
    ToolCallConstrainer,
    output_grammar,
    parse_forced_tool_call,
    tool_call_grammar,
)
from tools.json_schema_grammar import ToolSchemaError

PYTHON_PARAMS = {
    "type": "object",
    "properties": {"code": {"type": "string"}},
    "required": ["code"],
}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
NESTED_PARAMS = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "options": {
            "type": "object",
            "properties": {"dry_run": {"type": "boolean"}, "level": {"type": "integer"}},
            "required": ["dry_run"],
        },
    },
    "required": ["title", "count", "tags", "options"],
}


def _tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


PYTHON = _tool("python", PYTHON_PARAMS)
WEATHER = _tool("get_weather", WEATHER_PARAMS)
PLAN = _tool("make_plan", NESTED_PARAMS)


def _matcher(functions: list[FunctionSpec], **bounds: int) -> xgr.GrammarMatcher:
    info = xgr.TokenizerInfo(["a", "b"], vocab_type=xgr.VocabType.RAW)
    grammar = xgr.Grammar.from_ebnf(tool_call_grammar(functions, **bounds))
    return xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(grammar))


def _accepts(functions: list[FunctionSpec], text: str, **bounds: int) -> tuple[bool, bool]:
    """(every character accepted, the grammar is complete afterwards)."""
    matcher = _matcher(functions, **bounds)
    accepted = matcher.accept_string(text)
    return accepted, accepted and matcher.is_completed()


def _call(name: str, arguments: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


# -- the grammar on its own -------------------------------------------------------------------


def test_grammar_accepts_valid_calls_and_rejects_invalid_prefixes():
    python = [FunctionSpec("python", PYTHON_PARAMS)]
    assert _accepts(python, _call("python", '{"code": "print(17*23)"}')) == (True, True)
    assert _accepts(python, _call("python", r'{"code": "a\nb \"q\" \u00e9"}')) == (True, True)
    assert _accepts(python, '<tool_call>{"name": "python", "argu') == (True, False)
    assert not _accepts(python, '<tool_call>{"name": "pythn"')[0]
    assert not _accepts(python, '<tool_call> {"name"')[0]  # no free whitespace
    assert not _accepts(python, _call("python", "{}"))[0]  # required property missing
    assert not _accepts(python, _call("python", '{"code": "x", "extra": 1}'))[0]
    assert not _accepts(python, _call("python", '{"code": 5}'))[0]
    assert not _accepts(python, _call("python", '{"code": "a\nb"}'))[0]  # raw control char
    assert not _accepts(python, _call("python", '{"code": "\\q"}'))[0]  # bad escape


def test_grammar_choice_of_functions_enum_and_nested_types():
    both = [FunctionSpec("get_weather", WEATHER_PARAMS), FunctionSpec("python", PYTHON_PARAMS)]
    assert _accepts(both, _call("get_weather", '{"city": "Oslo", "unit": "c"}'))[1]
    assert _accepts(both, _call("python", '{"code": ""}'))[1]
    assert not _accepts(both, _call("get_weather", '{"city": "Oslo", "unit": "k"}'))[0]
    assert not _accepts(both, _call("get_weather", '{"unit": "c", "city": "Oslo"}'))[0]

    plan = [FunctionSpec("make_plan", NESTED_PARAMS)]
    good = '{"title": "t", "count": -12, "tags": ["a", "b"], "options": {"dry_run": true}}'
    assert _accepts(plan, _call("make_plan", good))[1]
    full = (
        '{"title": "t", "count": 0, "ratio": 2.5, "tags": [], '
        '"options": {"dry_run": false, "level": 3}}'
    )
    assert _accepts(plan, _call("make_plan", full))[1]
    for bad_count in ("01", "1.5", "1e3", '"1"'):
        assert not _accepts(plan, _call("make_plan", good.replace("-12", bad_count)))[0]
    too_many = good.replace('["a", "b"]', '["a", "b", "c", "d"]')
    assert not _accepts(plan, _call("make_plan", too_many))[0]
    assert not _accepts(plan, _call("make_plan", good.replace("true", "1")))[0]


def test_grammar_bounds_strings_arrays_and_delegates_numeric_ranges():
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string", "maxLength": 4},
            "xs": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10}},
        },
        "required": ["s", "xs"],
    }
    spec = [FunctionSpec("f", schema)]
    bounds = {"max_array_items": 2}
    assert _accepts(spec, _call("f", '{"s": "abcd", "xs": [1, 10]}'), **bounds)[1]
    assert not _accepts(spec, _call("f", '{"s": "abcde"'), **bounds)[0]
    assert not _accepts(spec, _call("f", '{"s": "\\n"'), **bounds)[0]  # bounded: no escapes
    assert not _accepts(spec, _call("f", '{"s": "", "xs": [1, 2, 3]}'), **bounds)[0]
    assert not _accepts(spec, _call("f", '{"s": "", "xs": [11]}'), **bounds)[0]
    assert not _accepts(spec, _call("f", '{"s": "", "xs": [0]}'), **bounds)[0]


def test_grammar_resolves_recursive_refs_and_rejects_bad_schemas():
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"items": {"$ref": "#/$defs/node"}},
                },
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    }
    spec = [FunctionSpec("t", tree)]
    assert _accepts(spec, _call("t", '{"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}'))[1]
    with pytest.raises(ToolSchemaError):
        tool_call_grammar([FunctionSpec("f", {"$ref": "#/$defs/missing"})])
    with pytest.raises(ToolSchemaError):
        tool_call_grammar([FunctionSpec("f", {"type": "object", "properties": {"x": False}})])
    with pytest.raises(ToolSchemaError):
        tool_call_grammar([FunctionSpec("f", {"type": "tuple"})])


def test_parse_reports_truncated_and_malformed_calls_as_incomplete():
    done = parse_forced_tool_call(_call("python", '{"code": "1"}'))
    assert done.complete and done.name == "python" and done.arguments == {"code": "1"}
    for text in ("", "<tool_call>", '<tool_call>{"name": "python", "argu', "hello"):
        assert parse_forced_tool_call(text) == (None, None, False)
    assert not parse_forced_tool_call("<tool_call>[1]</tool_call>").complete


# -- the sampler hook --------------------------------------------------------------------------


def test_sampler_applies_processors_in_order_before_bans_and_keeps_raw_logprobs():
    calls: list[tuple[list[int], str]] = []

    def forbid(token_id: int, label: str):
        def processor(output_token_ids, logits):
            calls.append((list(output_token_ids), label))
            logits[token_id] = float("-inf")
            return logits

        return processor

    logits = torch.tensor([[9.0, 8.0, 7.0, 6.0]])
    params = SamplingParams(
        temperature=0.0, logprobs=1, logits_processors=[forbid(0, "a"), forbid(1, "b")]
    )
    token_id, logprob = sample(logits, [SamplingRow(params, None, [2], [5, 6])])[0]
    assert token_id == 3
    assert calls == [([5, 6], "a"), ([5, 6], "b")]
    assert logits[0, 0] == 9.0  # the processors got a copy
    assert logprob is not None and logprob.top[0][0] == 0
    assert logprob.logprob == pytest.approx(float(torch.log_softmax(logits[0], 0)[3]))
    with pytest.raises(Exception, match="logits_processors"):
        SamplingParams(logits_processors=[1]).validate()  # type: ignore[list-item]


# -- SmolLM2 through the engine ----------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(smollm2):
    return make_engine(smollm2)


@pytest.fixture(scope="module")
def constrainer(engine):
    vocab_size = engine.loaded.config.vocab_size
    return ToolCallConstrainer(engine.tokenizer, vocab_size, sorted(engine.eos_token_ids))


class _Timed:
    """Wraps a processor and accumulates the time spent in it."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, output_token_ids, logits):
        start = time.perf_counter()
        result = self.inner(output_token_ids, logits)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return result


def _run(engine, jobs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    for request_id, (prompt, params) in jobs.items():
        engine.add_request(request_id, prompt, params)
    merged: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
    return merged


def test_smollm2_forced_calls_are_valid(engine, constrainer):
    """Named, "required" (two tools) and nested-schema calls, batched together, all greedy."""
    cases = {
        "named": ("Compute 17*23 with python", [PYTHON], {"name": "python"}),
        "required": ("What is the weather in Paris?", [WEATHER, PYTHON], "required"),
        "nested": ("Plan a picnic with 3 tags.", [PLAN], "make_plan"),
    }
    timers, jobs = {}, {}
    for request_id, (question, tools, choice) in cases.items():
        prompt = engine.apply_chat_template([{"role": "user", "content": question}], tools=tools)
        timers[request_id] = _Timed(constrainer.processor_for(tools, choice))
        params = SamplingParams(
            temperature=0.0, max_tokens=400, logits_processors=[timers[request_id]]
        )
        jobs[request_id] = (prompt, params)
    start = time.perf_counter()
    outputs = _run(engine, jobs)
    elapsed = time.perf_counter() - start

    schemas = {"python": PYTHON_PARAMS, "get_weather": WEATHER_PARAMS, "make_plan": NESTED_PARAMS}
    for request_id, (_, tools, choice) in cases.items():
        out = outputs[request_id]
        call = parse_forced_tool_call(out.new_text)
        assert out.finish_reason == "stop", out.new_text
        assert call.complete, out.new_text
        assert call.name in {t["function"]["name"] for t in tools}
        if choice != "required":
            assert call.name == tools[0]["function"]["name"]
        strict = {**schemas[str(call.name)], "additionalProperties": False}
        jsonschema.validate(call.arguments, strict)
    assert isinstance(parse_forced_tool_call(outputs["named"].new_text).arguments["code"], str)

    num_calls = sum(t.calls for t in timers.values())
    per_token_ms = 1000 * sum(t.seconds for t in timers.values()) / num_calls
    steps_ms = 1000 * elapsed / max(len(o.new_token_ids) for o in outputs.values())
    print(f"\nconstrained processor: {per_token_ms:.3f} ms/token over {num_calls} tokens; ")
    print(f"engine: {steps_ms:.1f} ms/step (3 requests batched)")
    for request_id, out in outputs.items():
        print(f"  {request_id}: {out.new_text}")
    assert per_token_ms < 10.0


def test_smollm2_max_tokens_gives_an_incomplete_call(engine, constrainer):
    prompt = engine.apply_chat_template([{"role": "user", "content": "Compute 17*23 with python"}])
    processor = constrainer.processor_for([PYTHON], "python")
    params = SamplingParams(temperature=0.0, max_tokens=6, logits_processors=[processor])
    out = _run(engine, {"short": (prompt, params)})["short"]
    assert out.finish_reason == "length"
    assert out.new_text and "<tool_call>".startswith(out.new_text[:11])
    assert parse_forced_tool_call(out.new_text) == (None, None, False)


def test_constrainer_choices_and_errors(constrainer):
    assert constrainer.processor_for([PYTHON], "auto") is None
    assert constrainer.processor_for([PYTHON], "none") is None
    flat = {"type": "function", "name": "python", "parameters": PYTHON_PARAMS}
    assert constrainer.processor_for([flat], {"type": "function", "name": "python"}) is not None
    with pytest.raises(ToolSchemaError):
        constrainer.processor_for([PYTHON], "get_weather")
    with pytest.raises(ToolSchemaError):
        constrainer.processor_for([], "required")
    with pytest.raises(ToolSchemaError):
        constrainer.processor_for([_tool("f", {"type": "object", "properties": 3})], "f")


def test_processor_masks_to_the_grammar_and_resyncs(constrainer, engine):
    tokenizer = engine.tokenizer
    processor = constrainer.processor_for([PYTHON], "python")
    vocab_size = engine.loaded.config.vocab_size
    head = '<tool_call>{"name": "python", "arguments": '
    prefix = tokenizer.encode(head + '{"code": "x"}}', add_special_tokens=False)
    masked = processor(prefix, torch.zeros(vocab_size))
    allowed = torch.isfinite(masked).nonzero().flatten().tolist()
    assert allowed and all("</tool_call>".startswith(tokenizer.decode([t])) for t in allowed)
    done = prefix + tokenizer.encode("</tool_call>", add_special_tokens=False)
    only_stop = torch.isfinite(processor(done, torch.zeros(vocab_size))).nonzero().flatten()
    assert only_stop.tolist() == sorted(engine.eos_token_ids)
    fresh = torch.isfinite(processor([], torch.zeros(vocab_size))).nonzero().flatten().tolist()
    assert fresh and all(head.startswith(tokenizer.decode([t])) for t in fresh)
    hello = tokenizer.encode("hello", add_special_tokens=False)
    off_grammar = processor(hello, torch.zeros(vocab_size))
    assert processor.diverged and torch.isfinite(off_grammar).all()


def test_smollm2_closes_the_call_once_the_token_budget_is_spent(engine, constrainer):
    """``max_call_tokens=0``: every value is closed as early as the grammar allows."""
    prompt = engine.apply_chat_template([{"role": "user", "content": "Plan a long trip."}])
    processor = constrainer.processor_for([PLAN], "make_plan", max_call_tokens=0)
    params = SamplingParams(temperature=0.0, max_tokens=200, logits_processors=[processor])
    out = _run(engine, {"budget": (prompt, params)})["budget"]
    call = parse_forced_tool_call(out.new_text)
    assert out.finish_reason == "stop" and call.complete, out.new_text
    jsonschema.validate(call.arguments, NESTED_PARAMS)
    assert call.arguments is not None and call.arguments["title"] == ""
    print(f"\nbudget 0: {len(out.new_token_ids)} tokens: {out.new_text}")


def test_pattern_leaf_keeps_xgrammar_named_arguments():
    """xgrammar writes a ``pattern`` as ``Regex("...", json_string=true)``; renaming its rules
    into the call grammar must leave the named argument alone (it used to break the build)."""
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"}},
        "required": ["code"],
    }
    text = tool_call_grammar([FunctionSpec("book", schema)])
    assert "json_string=true" in text.replace(" ", "")
    xgr.Grammar.from_ebnf(text)  # raises on a malformed grammar


def test_grammar_writes_each_call_format_and_json_answers():
    """Forced calls in the format the parser reads (issue 13, item 5); JSON answers (item 3)."""
    python = [FunctionSpec("python", PYTHON_PARAMS)]
    info = xgr.TokenizerInfo(["a", "b"], vocab_type=xgr.VocabType.RAW)

    def accepts(text: str, call_format="hermes", answer=None, functions=python) -> bool:
        grammar = xgr.Grammar.from_ebnf(output_grammar(functions, answer, call_format))
        matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(grammar))
        return matcher.accept_string(text) and matcher.is_completed()

    args = '{"code": "1+1"}'
    assert accepts('{"name": "python", "parameters": ' + args + "}", "llama3_json")
    assert not accepts('{"name": "python", "arguments": ' + args + "}", "llama3_json")
    assert accepts('[TOOL_CALLS][{"name": "python", "arguments": ' + args + "}]", "mistral")
    assert not accepts(_call("python", args), "mistral")
    any_object = JsonAnswer(None)
    assert accepts('{"a": [1, "x", {"b": null}],"c":true}', answer=any_object, functions=[])
    assert not accepts("[1]", answer=any_object, functions=[])
    assert not accepts('{"a":  1}', answer=any_object, functions=[])  # one space at most
    answer = JsonAnswer({"type": "object", "properties": {"n": {"type": "integer"}}})
    assert accepts(_call("python", args), answer=answer)  # "auto": a call or the answer
    assert accepts('{"n": 3}', answer=answer) and accepts("{}", answer=answer)
    # Two documents may define the same $defs name differently.
    tool = {"$defs": {"T": {"type": "integer"}}, "properties": {"t": {"$ref": "#/$defs/T"}}}
    own = {"$defs": {"T": {"type": "boolean"}}, "properties": {"t": {"$ref": "#/$defs/T"}}}
    defs = [FunctionSpec("f", tool)]
    assert accepts('{"t": true}', answer=JsonAnswer(own), functions=defs)
    assert accepts(_call("f", '{"t": 1}'), answer=JsonAnswer(own), functions=defs)
    assert not accepts('{"t": 1}', answer=JsonAnswer(own), functions=defs)
