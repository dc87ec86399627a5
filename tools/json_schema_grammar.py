"""JSON schema -> EBNF grammar (xgrammar dialect) whose sentences are compact JSON values.

The grammar generates a *subset* of the values the schema accepts, chosen so that every
sentence is valid and generation terminates:

- objects hold the declared ``properties`` in declared order (required ones always, optional
  ones optionally; a ``required`` name without a declared schema gets a scalar) and never
  additional properties, whatever ``additionalProperties`` says;
- strings without ``maxLength`` are unbounded here (the processor in ``tools.constrained``
  closes them when its token budget runs out) and may hold JSON escapes; strings with
  ``maxLength`` hold at most ``min(maxLength, MAX_BOUNDED_STRING_CHARS)`` characters and no
  escapes (xgrammar matches a repeated single character class quickly, but a repeated
  "character or escape" alternative costs ~100 ms per token);
- arrays hold at most ``max_array_items`` items (or the schema's smaller ``maxItems``);
- integers have at most 15 digits, numbers at most 15 integer and 6 fraction digits and no
  exponent; numeric bounds (``minimum``, ``maximum``, exclusive ones) and string ``pattern`` /
  ``format`` are delegated to xgrammar's own JSON-schema converter for that one value;
- ``enum`` / ``const`` are literals, ``anyOf`` / ``oneOf`` / ``type`` lists are alternatives
  (``oneOf`` is not checked for exclusivity), ``allOf`` is merged shallowly, local ``$ref``
  (``#/$defs/..``, ``#/definitions/..``) becomes a rule, so recursive schemas work but are
  unbounded in depth;
- a schema with no type and no structure keywords (``{}`` or ``true``) generates a scalar;
- ``minLength`` / ``minItems`` above ``MAX_BOUNDED_STRING_CHARS`` / ``MAX_MIN_ITEMS`` raise
  ``ToolSchemaError`` (such values cannot be generated within a sane token budget).

``any_object_rule()`` adds a rule for any JSON object (``response_format`` ``json_object``):
string keys, values of any type, arrays of at most ``max_array_items`` items, no whitespace
but one optional space after ``:`` and ``,``.

Not enforced: ``multipleOf``, ``uniqueItems``, ``not``, ``if``/``then``/``else``,
``patternProperties``, ``prefixItems``, ``dependentRequired``. A schema that admits no value
(``false``) or is malformed raises ``ToolSchemaError``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.errors import InvalidRequestError

DEFAULT_MAX_ARRAY_ITEMS = 16
MAX_BOUNDED_STRING_CHARS = 256
MAX_MIN_ITEMS = 256

_NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_COMBINATORS = ("anyOf", "oneOf")
# In xgrammar EBNF text: string literals, character classes, named arguments (kept as they
# are) and identifiers (not calls).
_EBNF_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # string literal
    r"|\[(?:[^\]\\]|\\.)*\]"  # character class
    r"|[A-Za-z_][A-Za-z0-9_]*\s*=(?!=)\s*[A-Za-z0-9_]+"  # named argument: Regex(.., a=true)
    r"|[A-Za-z_][A-Za-z0-9_]*\b(?!\s*\()"  # rule name (not a builtin call such as Regex(...))
)

_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ", re.MULTILINE)

_COMMON_RULES = {
    # Strings as a right-recursive rule: xgrammar precomputes its token masks (~0.01 ms/token).
    "json_string": '"\\"" json_string_tail',
    "json_string_tail": '"\\"" | json_plain json_string_tail | "\\\\" json_escape json_string_tail',
    "json_plain": r'[^"\\\0-\x1f]',
    "json_escape": r'[\"\\/bfnrt] | "u" [0-9a-fA-F]{4}',
    "json_int": r'"0" | "-"? [1-9] [0-9]{0,14}',
    "json_number": r'json_int ("." [0-9]{1,6})?',
    "json_bool": '"true" | "false"',
    "json_null": '"null"',
    "json_scalar": "json_string | json_number | json_bool | json_null",
}
_ANY_VALUE_RULES = {
    "json_any": "json_any_object | json_any_array | json_scalar",
    # ":" and "," take an optional space: where the value's type is free, the forced text must
    # end before the space, so the model can write it as part of its next token (' "', ' 1').
    "json_any_object": '"{" (json_any_member ("," " "? json_any_member)*)? "}"',
    "json_any_member": 'json_string ":" " "? json_any',
}


class ToolSchemaError(InvalidRequestError):
    """A tool's parameters schema is malformed or admits no value."""


def ebnf_literal(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal (quoted, escaped)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in escaped)
    return f'"{escaped}"'


def json_literal(value: object) -> str:
    """``value`` serialised as compact JSON (``", "`` / ``": "``), as an EBNF literal."""
    return ebnf_literal(json.dumps(value, ensure_ascii=False))


class SchemaGrammarBuilder:
    """Collects EBNF rules; ``value_expr(schema)`` returns an expression for one JSON value.

    One builder per grammar: rule names are unique within it. ``rules_text()`` renders every
    rule collected so far (the caller adds ``root``).
    """

    def __init__(self, max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS) -> None:
        self.max_array_items = max_array_items
        self._rules: dict[str, str] = dict(_COMMON_RULES)
        self._ref_rules: dict[str, str] = {}
        self._root_schema: dict[str, Any] = {}

    def rules_text(self) -> str:
        return "\n".join(f"{name} ::= {body}" for name, body in self._rules.items())

    def add_rule(self, hint: str, body: str) -> str:
        """Add ``body`` under a fresh name derived from ``hint``; return the name."""
        base = re.sub(r"[^A-Za-z0-9_]", "_", hint) or "r"
        name, suffix = base, 0
        while name in self._rules:
            suffix += 1
            name = f"{base}_{suffix}"
        self._rules[name] = body
        return name

    def schema_rule(self, schema: object, hint: str) -> str:
        """A rule for a whole document schema (its ``$defs`` resolve ``$ref``); return its name.

        Each document has its own ``$ref`` namespace: two schemas may both define
        ``#/$defs/Item`` differently."""
        self._root_schema = schema if isinstance(schema, dict) else {}
        self._ref_rules = {}
        try:
            return self.add_rule(hint, self.value_expr(schema, hint))
        except (TypeError, ValueError, AttributeError, RecursionError) as exc:
            if isinstance(exc, ToolSchemaError):
                raise
            raise ToolSchemaError(f"malformed schema at {hint!r}: {exc!r}") from exc

    def any_object_rule(self) -> str:
        """The rule for any JSON object (see the module docstring); return its name."""
        self._rules.update(_ANY_VALUE_RULES)
        limit = max(self.max_array_items - 1, 0)
        self._rules["json_any_array"] = f'"[]" | "[" json_any ("," " "? json_any){{0,{limit}}} "]"'
        return "json_any_object"

    def value_expr(self, schema: object, hint: str) -> str:
        if schema is True or schema == {}:
            return "json_scalar"
        if not isinstance(schema, dict):
            raise ToolSchemaError(f"schema at {hint!r} must be an object, got {schema!r}")
        if "$ref" in schema:
            return self._ref_expr(schema["$ref"], hint)
        if "allOf" in schema:
            return self.value_expr(_merge_all_of(schema), hint)
        if "const" in schema:
            return json_literal(schema["const"])
        if "enum" in schema:
            return self._enum_expr(schema["enum"], hint)
        for key in _COMBINATORS:
            if key in schema:
                return self._alternatives(schema, key, hint)
        return self._typed_expr(schema, hint)

    def _typed_expr(self, schema: dict[str, Any], hint: str) -> str:
        types = schema.get("type")
        if types is None:
            if "properties" in schema or "required" in schema:
                types = "object"
            elif "items" in schema:
                types = "array"
            else:
                return "json_scalar"
        if isinstance(types, list):
            if not types:
                raise ToolSchemaError(f"empty type list at {hint!r}")
            exprs = [self._typed_expr({**schema, "type": t}, f"{hint}_{t}") for t in types]
            return "(" + " | ".join(exprs) + ")"
        if types == "object":
            return self._object_expr(schema, hint)
        if types == "array":
            return self._array_expr(schema, hint)
        if types == "string":
            return self._string_expr(schema, hint)
        if types in ("integer", "number"):
            if any(key in schema for key in _NUMERIC_BOUNDS):
                return self._delegated_expr(schema, hint)
            return "json_int" if types == "integer" else "json_number"
        if types == "boolean":
            return "json_bool"
        if types == "null":
            return "json_null"
        raise ToolSchemaError(f"unknown type {types!r} at {hint!r}")

    def _enum_expr(self, values: object, hint: str) -> str:
        if not isinstance(values, list) or not values:
            raise ToolSchemaError(f"enum at {hint!r} must be a non-empty list")
        return "(" + " | ".join(json_literal(v) for v in values) + ")"

    def _alternatives(self, schema: dict[str, Any], key: str, hint: str) -> str:
        options = schema[key]
        if not isinstance(options, list) or not options:
            raise ToolSchemaError(f"{key} at {hint!r} must be a non-empty list")
        siblings = {k: v for k, v in schema.items() if k != key}
        exprs = []
        for idx, option in enumerate(options):
            merged = {**siblings, **option} if isinstance(option, dict) else option
            exprs.append(self.add_rule(f"{hint}_alt{idx}", self.value_expr(merged, hint)))
        return "(" + " | ".join(exprs) + ")"

    def _object_expr(self, schema: dict[str, Any], hint: str) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise ToolSchemaError(f"bad properties/required at {hint!r}")
        properties = dict(properties)
        extra = schema.get("additionalProperties")
        for name in required:
            properties.setdefault(name, extra if isinstance(extra, dict) else {})
        entries: list[tuple[str, bool, str]] = []  # (key literal, is required, value rule)
        for name, sub in properties.items():
            key_literal = ebnf_literal(json.dumps(name, ensure_ascii=False) + ": ")
            value_rule = self.add_rule(f"{hint}_{name}", self.value_expr(sub, f"{hint}_{name}"))
            entries.append((key_literal, name in required, value_rule))
        # tail[(k, comma)]: properties k.. in order; ``comma``: one was already written.
        tail = {(len(entries), False): '""', (len(entries), True): '""'}
        for idx in range(len(entries) - 1, -1, -1):
            key_literal, is_required, value_rule = entries[idx]
            for comma in (False, True):
                sep = '", " ' if comma else ""
                present = f"{sep}{key_literal} {value_rule} {tail[(idx + 1, True)]}"
                body = present if is_required else f"({present}) | {tail[(idx + 1, comma)]}"
                tail[(idx, comma)] = self.add_rule(f"{hint}_p{idx}{'c' if comma else ''}", body)
        return f'"{{" {tail[(0, False)]} "}}"'

    def _array_expr(self, schema: dict[str, Any], hint: str) -> str:
        min_items = _count(schema, "minItems", 0)
        if min_items > MAX_MIN_ITEMS:
            raise ToolSchemaError(f"minItems above {MAX_MIN_ITEMS} is not supported at {hint!r}")
        max_items = min(_count(schema, "maxItems", self.max_array_items), self.max_array_items)
        max_items = max(max_items, min_items)
        if max_items == 0:
            return '"[]"'
        item = self.add_rule(f"{hint}_item", self.value_expr(schema.get("items", {}), hint))
        more = self.add_rule(f"{hint}_more", f'", " {item}')
        low = max(min_items - 1, 0)
        items = f'"[" {item} {more}{{{low},{max_items - 1}}} "]"'
        return items if min_items > 0 else f'("[]" | {items})'

    def _string_expr(self, schema: dict[str, Any], hint: str) -> str:
        if "pattern" in schema or "format" in schema:
            return self._delegated_expr(schema, hint)
        min_chars = _count(schema, "minLength", 0)
        if min_chars > MAX_BOUNDED_STRING_CHARS:
            raise ToolSchemaError(
                f"minLength above {MAX_BOUNDED_STRING_CHARS} is not supported at {hint!r}"
            )
        if "maxLength" not in schema:
            if min_chars == 0:
                return "json_string"
            return f'"\\"" json_plain{{{min_chars},{min_chars}}} json_string_tail'
        max_chars = min(_count(schema, "maxLength", 0), MAX_BOUNDED_STRING_CHARS)
        max_chars = max(max_chars, min_chars)
        return f'"\\"" json_plain{{{min_chars},{max_chars}}} "\\""'

    def _delegated_expr(self, schema: dict[str, Any], hint: str) -> str:
        """One leaf value through xgrammar's converter, its rules renamed into this grammar."""
        import xgrammar as xgr

        try:
            text = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError on bad schemas
            raise ToolSchemaError(
                f"unsupported schema {json.dumps(schema)} at {hint!r}: {xgrammar_message(exc)}"
            ) from exc
        prefix = self.add_rule(f"{hint}_leaf", '""') + "_"

        def rename(match: re.Match[str]) -> str:
            token = match.group(0)
            return token if token[0] in '"[' or "=" in token else prefix + token

        for line in text.strip().splitlines():
            name, _, body = line.partition(" ::= ")
            self._rules[prefix + name] = _EBNF_TOKEN.sub(rename, body)
        return prefix + "root"

    def _ref_expr(self, ref: object, hint: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise ToolSchemaError(f"only local $ref is supported, got {ref!r} at {hint!r}")
        if ref not in self._ref_rules:
            target: object = self._root_schema
            for part in ref[2:].split("/"):
                if not isinstance(target, dict) or part not in target:
                    raise ToolSchemaError(f"unresolvable $ref {ref!r}")
                target = target[part]
            name = self.add_rule(f"ref_{ref[2:]}", '""')
            self._ref_rules[ref] = name
            self._rules[name] = self.value_expr(target, name)
        return self._ref_rules[ref]


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's error text without its ``[time] source.cc:line:`` prefix."""
    return _XGRAMMAR_PREFIX.sub("", str(exc)).strip()


def _count(schema: dict[str, Any], key: str, default: int) -> int:
    value = schema.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ToolSchemaError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _merge_all_of(schema: dict[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        if not isinstance(part, dict):
            raise ToolSchemaError("allOf entries must be objects")
        for key, value in part.items():
            if key == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required":
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged
