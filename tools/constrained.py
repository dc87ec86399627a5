"""Constrained output: forced tool calls (``tool_choice``) and JSON answers (``response_format``).

Contract. ``ToolCallConstrainer(tokenizer, vocab_size, stop_token_ids, call_format)`` is built
once per tokenizer (it precomputes the decoded vocabulary, ~0.2 s, and caches compiled grammars).
``processor_for(tools, tool_choice)`` returns a fresh ``ToolCallLogitsProcessor`` for ONE
request (put it in ``SamplingParams.logits_processors``); with it the output is exactly one call
written in ``call_format`` (the format the server's tool-call parser reads), then a stop token:

- ``hermes``:      ``<tool_call>{"name": "<NAME>", "arguments": <ARGS>}</tool_call>``
- ``llama3_json``: ``{"name": "<NAME>", "parameters": <ARGS>}``
- ``mistral``:     ``[TOOL_CALLS][{"name": "<NAME>", "arguments": <ARGS>}]``

where NAME is the named function (or, for "required", any of ``tools``) and ARGS is compact JSON
valid against that function's ``parameters`` schema, within the subset described in
``tools.json_schema_grammar`` (arrays <= 16 items by default). Token-level matching is done by
xgrammar over the tokenizer's vocabulary.

``answer_processor(answer, tools)`` constrains the output to one compact JSON value valid against
``answer.schema`` (or any JSON object when the schema is None), then a stop token; with
``tools`` the output may instead be one call to any of them (``tool_choice`` "auto" together with
a ``response_format``: the model chooses, as with OpenAI).

Termination: after ``max_call_tokens`` output tokens (default 512) the processor closes the call
as fast as the grammar allows: whenever the token ``"`` is allowed it allows only that (inside a
string it ends the string; elsewhere it starts a minimal one), else whenever an allowed token
consists only of ``]`` and ``}`` it allows only such tokens, so open strings, arrays and objects
end and the remaining required properties get minimal values. (Preferring any token made of
``"]}`` let a string grow by ``]]}}`` forever: inside a string those are plain characters.)
For non-recursive schemas that takes a few dozen tokens more, so give the request
``max_tokens`` >= ``max_call_tokens`` + 64.

Failure behaviour:
- an unknown function name, a malformed ``tools`` list or an unusable schema raise
  ``ToolSchemaError`` (an ``InvalidRequestError``) before anything is submitted;
- if ``max_tokens`` runs out first, the text is a truncated prefix of a call, and
  ``parse_forced_tool_call`` (Hermes format) reports it with ``complete=False`` (the
  tool-call parser returns it as plain text with no call);
- if the output leaves the grammar anyway (``ignore_eos`` after the call, or tokens the
  processor did not allow), the processor stops constraining and passes logits through; the
  parse of such text may fail (``complete=False``).
Do not combine with ``min_tokens`` larger than the call: the processor allows only the stop
token after the call, which ``min_tokens`` bans, leaving no token to sample.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import xgrammar as xgr

from tools.json_schema_grammar import (
    DEFAULT_MAX_ARRAY_ITEMS,
    SchemaGrammarBuilder,
    ToolSchemaError,
    ebnf_literal,
    xgrammar_message,
)
from tools.tool_call import ToolCallFormat

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
DEFAULT_MAX_CALL_TOKENS = 512
_MAX_CACHED_GRAMMARS = 64
_CLOSER_BYTES = frozenset(b"]}")


class FunctionSpec(NamedTuple):
    name: str
    parameters: dict[str, Any]


class JsonAnswer(NamedTuple):
    """A JSON answer (``response_format``): ``schema`` None means any JSON object."""

    schema: dict[str, Any] | None


class ParsedToolCall(NamedTuple):
    """``complete``: the closing tag was generated and the JSON parsed with a str name and a
    dict of arguments. Otherwise ``name`` / ``arguments`` are None."""

    name: str | None
    arguments: dict[str, Any] | None
    complete: bool


class ToolCallLogitsProcessor:
    """Masks every token that would leave the tool-call grammar (see the module docstring).

    Stateful: it advances its matcher with the output tokens it has not seen yet, so one
    instance serves one request. If the ids it is given stop extending what it accepted
    (another request, or a rewritten history) it resets and replays them. ``closer_mask``
    ``[vocab]`` (int8) ranks the tokens preferred once ``max_call_tokens`` were generated
    (2: ``"``, 1: made of ``]`` and ``}``, 0: others; the best allowed rank wins);
    ``first_token_of(text)`` is the first token of the tokenizer's encoding of ``text``.
    """

    def __init__(
        self,
        compiled: xgr.CompiledGrammar,
        stop_token_ids: list[int],
        closer_mask: torch.Tensor,
        max_call_tokens: int,
        first_token_of: Callable[[str], int | None],
    ) -> None:
        self._first_token_of = first_token_of
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        self._bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
        self._closer_mask = closer_mask
        self._max_call_tokens = max_call_tokens
        self._accepted: list[int] = []
        self.diverged = False  # True once the output left the grammar: no more masking

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self._sync(output_token_ids)
        if self.diverged or self._matcher.is_terminated():
            return logits
        self._matcher.fill_next_token_bitmask(self._bitmask)
        xgr.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device))
        forced_text = self._matcher.find_jump_forward_string()
        forced_id = self._first_token_of(forced_text) if forced_text else None
        if forced_id is not None and bool(torch.isfinite(logits[forced_id])):
            kept = logits[forced_id].clone()
            logits.fill_(float("-inf"))
            logits[forced_id] = kept
        elif len(self._accepted) >= self._max_call_tokens:
            ranks = self._closer_mask.to(logits.device).masked_fill(~torch.isfinite(logits), 0)
            best = int(ranks.max())
            if best > 0:
                logits = logits.masked_fill(ranks != best, float("-inf"))
        return logits

    def _sync(self, output_token_ids: Sequence[int]) -> None:
        num_seen = len(self._accepted)
        if list(output_token_ids[:num_seen]) != self._accepted:
            self._matcher.reset()
            self._accepted = []
            self.diverged = False
            num_seen = 0
        for token_id in output_token_ids[num_seen:]:
            self._accepted.append(token_id)
            if not self.diverged and not self._matcher.accept_token(token_id):
                self.diverged = True


class ToolCallConstrainer:
    """Builds tool-call logits processors for one tokenizer; caches compiled grammars.

    ``vocab_size`` is the model's logits width (it may exceed the tokenizer's; the extra ids are
    never allowed). ``stop_token_ids`` are the ids allowed after the closing tag (the engine's
    EOS ids). ``call_format``: the format forced calls are written in. Not thread-safe.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS,
        max_call_tokens: int = DEFAULT_MAX_CALL_TOKENS,
        call_format: ToolCallFormat = "hermes",
    ) -> None:
        if call_format not in _CALL_HEADS:
            raise ValueError(f"unknown tool call format {call_format!r}")
        self.call_format: ToolCallFormat = call_format
        if not stop_token_ids:
            raise ValueError("stop_token_ids must not be empty: the call could never end")
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self._tokenizer = tokenizer
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_array_items = max_array_items
        self.max_call_tokens = max_call_tokens
        self.closer_mask = torch.zeros(vocab_size, dtype=torch.int8)
        for token_id, text in enumerate(self.tokenizer_info.decoded_vocab[:vocab_size]):
            if text == b'"':
                self.closer_mask[token_id] = 2
            elif text and set(text) <= _CLOSER_BYTES:
                self.closer_mask[token_id] = 1
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)
        self._compiled: dict[str, xgr.CompiledGrammar] = {}

    def processor_for(
        self,
        tools: list[dict[str, Any]],
        tool_choice: str | dict[str, Any],
        max_call_tokens: int | None = None,
    ) -> ToolCallLogitsProcessor | None:
        """A processor forcing one call, or None for "auto" / "none" (nothing to force).

        ``tools``: OpenAI chat entries ``{"type": "function", "function": {"name", "parameters"}}``
        or flat ``{"name", "parameters"}``. ``tool_choice``: "required", "auto", "none", a
        function name, or ``{"type": "function", "function": {"name": ...}}`` / ``{"name": ...}``.
        ``max_call_tokens`` overrides the constrainer's closing budget for this request.
        Raises ``ToolSchemaError`` on an unknown name or a bad schema.
        """
        functions = _function_specs(tools)
        chosen = _chosen_functions(functions, tool_choice)
        if chosen is None:
            return None
        return self._processor(self.compiled_grammar(chosen), max_call_tokens)

    def answer_processor(
        self,
        answer: JsonAnswer,
        tools: list[dict[str, Any]] | None = None,
        max_call_tokens: int | None = None,
    ) -> ToolCallLogitsProcessor:
        """A processor forcing a JSON answer (or, with ``tools``, one call to any of them).

        Raises ``ToolSchemaError`` naming the problem when the schema cannot be compiled."""
        functions = _function_specs(tools) if tools else []
        return self._processor(self.compiled_grammar(functions, answer), max_call_tokens)

    def _processor(
        self, compiled: xgr.CompiledGrammar, max_call_tokens: int | None
    ) -> ToolCallLogitsProcessor:
        return ToolCallLogitsProcessor(
            compiled,
            self.stop_token_ids,
            self.closer_mask,
            self.max_call_tokens if max_call_tokens is None else max_call_tokens,
            self._first_token_of,
        )

    def _first_token_of(self, text: str) -> int | None:
        token_ids = self._tokenizer.encode(text, add_special_tokens=False)
        return int(token_ids[0]) if token_ids else None

    def compiled_grammar(
        self, functions: list[FunctionSpec], answer: JsonAnswer | None = None
    ) -> xgr.CompiledGrammar:
        """The compiled grammar of one call to any of ``functions`` or the JSON ``answer``
        (cached by content).

        Our own cache, keyed by the functions, rather than xgrammar's compiler cache (keyed by
        the grammar text): a hit here costs the key (~0.1-0.4 ms), a hit there also costs
        building the grammar text (~0.6-0.8 ms), measured with SmolLM2's tokenizer."""
        try:
            key = json.dumps([[list(f) for f in functions], answer], sort_keys=True)
        except (TypeError, ValueError) as exc:  # e.g. a circular schema built in-process
            raise ToolSchemaError(f"schema is not JSON: {exc}") from exc
        compiled = self._compiled.get(key)
        if compiled is None:
            grammar_text = output_grammar(functions, answer, self.call_format, self.max_array_items)
            try:
                grammar = xgr.Grammar.from_ebnf(grammar_text)
            except Exception as exc:  # xgrammar reports grammar errors as RuntimeError
                message = xgrammar_message(exc)
                raise ToolSchemaError(f"could not build the output grammar: {message}") from exc
            try:
                compiled = self._compiler.compile_grammar(grammar)
            except Exception as exc:
                message = xgrammar_message(exc)
                raise ToolSchemaError(f"could not compile the output grammar: {message}") from exc
            if len(self._compiled) >= _MAX_CACHED_GRAMMARS:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = compiled
        return compiled


# Per format: (text before the call's JSON, its arguments key, text after the call's JSON).
_CALL_HEADS: dict[ToolCallFormat, tuple[str, str, str]] = {
    "hermes": (TOOL_CALL_OPEN, "arguments", TOOL_CALL_CLOSE),
    "llama3_json": ("", "parameters", ""),
    "mistral": ("[TOOL_CALLS][", "arguments", "]"),
}


def tool_call_grammar(
    functions: list[FunctionSpec],
    max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS,
    call_format: ToolCallFormat = "hermes",
) -> str:
    """EBNF (root rule ``root``) of one call in ``call_format`` (see the module docstring)."""
    return output_grammar(functions, None, call_format, max_array_items)


def output_grammar(
    functions: list[FunctionSpec],
    answer: JsonAnswer | None,
    call_format: ToolCallFormat = "hermes",
    max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS,
) -> str:
    """EBNF (root rule ``root``): one call to any of ``functions`` or the JSON ``answer``."""
    if not functions and answer is None:
        raise ToolSchemaError("nothing to constrain: no function and no answer schema")
    builder = SchemaGrammarBuilder(max_array_items)
    alternatives = []
    if functions:
        open_text, arguments_key, close_text = _CALL_HEADS[call_format]
        calls = []
        for idx, function in enumerate(functions):
            try:
                args_rule = builder.schema_rule(function.parameters, f"args{idx}")
            except ToolSchemaError as exc:
                raise ToolSchemaError(f"parameters of function {function.name!r}: {exc}") from exc
            head = ebnf_literal(
                f'{open_text}{{"name": {json.dumps(function.name)}, "{arguments_key}": '
            )
            tail = ebnf_literal("}" + close_text)
            calls.append(builder.add_rule(f"call{idx}", f"{head} {args_rule} {tail}"))
        alternatives.append(builder.add_rule("calls", " | ".join(calls)))
    if answer is not None:
        if answer.schema is None:
            alternatives.append(builder.any_object_rule())
        else:
            alternatives.append(builder.schema_rule(answer.schema, "answer"))
    return f"root ::= {' | '.join(alternatives)}\n{builder.rules_text()}"


def parse_forced_tool_call(text: str) -> ParsedToolCall:
    """Parse the text a ``ToolCallLogitsProcessor`` produced; never raises.

    Truncated (``max_tokens``) or otherwise malformed text gives ``complete=False``.
    """
    stripped = text.strip()
    if not stripped.startswith(TOOL_CALL_OPEN) or not stripped.endswith(TOOL_CALL_CLOSE):
        return ParsedToolCall(None, None, False)
    try:
        call = json.loads(stripped[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
    except json.JSONDecodeError:
        return ParsedToolCall(None, None, False)
    if (
        not isinstance(call, dict)
        or not isinstance(call.get("name"), str)
        or not isinstance(call.get("arguments"), dict)
    ):
        return ParsedToolCall(None, None, False)
    return ParsedToolCall(call["name"], call["arguments"], True)


def _function_specs(tools: object) -> list[FunctionSpec]:
    if not isinstance(tools, list) or not tools:
        raise ToolSchemaError("tools must be a non-empty list")
    specs = []
    for tool in tools:
        entry = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ToolSchemaError(f"each tool needs a function name, got {tool!r}")
        parameters = entry.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ToolSchemaError(f"parameters of {entry['name']!r} must be a JSON schema object")
        specs.append(FunctionSpec(entry["name"], parameters))
    return specs


def _chosen_functions(
    functions: list[FunctionSpec], tool_choice: str | dict[str, Any]
) -> list[FunctionSpec] | None:
    if tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        return functions
    name: object = tool_choice
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, dict) else None
    chosen = [f for f in functions if f.name == name]
    if not chosen:
        raise ToolSchemaError(f"tool_choice names no given function: {tool_choice!r}")
    return chosen[:1]
