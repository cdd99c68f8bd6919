"""Structured output's formats as llguidance grammars, checked before any tokenizer is at hand.

The gateway refuses a format that does not compile before admitting the request, and the worker
compiles the same grammar against its model's tokenizer (`llmos.engine.structured`). A format is
at most `MAX_FORMAT_BYTES`; a JSON Schema at most `MAX_SCHEMA_DEPTH` deep; and both compile, and
the worker's matchers run, under `parser_limits()`: a bound on the lexer's states (its memory,
about 1-2 kB each), the fuel of building and of each step's mask (its time) and the grammar's
size. A format past them (a regex like `(b{1000}){1000}`) ends its own request with
INVALID_ARGUMENT `RESPONSE_FORMAT_TOO_COMPLEX`, at compile time or at the token where the lexer
hits the bound, and no other.
"""

from __future__ import annotations

import json
from functools import lru_cache

from .domain import FormatKind, ResponseFormat

MAX_FORMAT_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
# JSON as `json.dumps` writes it: no whitespace but after separators, so a model cannot spend
# its tokens on blank lines (a schema's own "x-guidance" options may say otherwise).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# llguidance's limits (its defaults in brackets). The lexer's states a grammar may build, counted
# over every copy of a matcher, which share one lexer (250,000: ~0.5 GB); the fuel of building
# its regexes and of its first mask (1,000,000: ~2 s and ~190 MB for `(b{1000}){1000}`; 100,000
# is still about twice what a 64 KiB schema needs), and of each later mask (200,000); the
# grammar's symbols (500,000). Errors never quote the output (`verbose_errors`).
MAX_LEXER_STATES = 50_000
INITIAL_LEXER_FUEL = 100_000
STEP_LEXER_FUEL = 50_000
MAX_GRAMMAR_SIZE = 50_000


def parser_limits():
    """llguidance's limits for every grammar llmos compiles or runs."""
    from llguidance import LLParserLimits

    return LLParserLimits(max_lexer_states=MAX_LEXER_STATES, initial_lexer_fuel=INITIAL_LEXER_FUEL,
                          step_lexer_fuel=STEP_LEXER_FUEL, max_grammar_size=MAX_GRAMMAR_SIZE,
                          verbose_errors=False)


# Words of llguidance's messages when a limit above (not the format's own syntax) stopped it.
_LIMIT_WORDS = ("too many", "fuel", "limit", "too large", "too big", "exceeded")


def hit_a_limit(message: str) -> bool:
    """Whether a compiler or matcher error says a resource limit stopped it."""
    lowered = message.lower()
    return any(word in lowered for word in _LIMIT_WORDS)


class FormatError(ValueError):
    """A format that cannot be used, with the reason (the compiler's message where it has one)."""


def _depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_SCHEMA_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def grammar_text(fmt: ResponseFormat) -> str:
    """The llguidance grammar of `fmt`, not yet checked; raises FormatError."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if fmt.kind is FormatKind.TOOLS:            # built by llmos from checked tools: no size of its own
        return LLMatcher.grammar_from_lark(fmt.spec)
    if len(fmt.spec.encode()) > MAX_FORMAT_BYTES:
        raise FormatError(f"is larger than {MAX_FORMAT_BYTES // 1024} KiB")
    if fmt.kind is FormatKind.JSON_OBJECT:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
    if fmt.kind is FormatKind.JSON_SCHEMA:
        try:
            schema = json.loads(fmt.spec)
        except json.JSONDecodeError as exc:
            raise FormatError(f"is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise FormatError("must be a JSON object (a schema)")
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise FormatError(f"is nested more than {MAX_SCHEMA_DEPTH} deep")
        try:
            return LLMatcher.grammar_from_json_schema(schema, JSON_OPTIONS)
        except ValueError as exc:
            raise FormatError(str(exc)) from None
    if not fmt.spec:
        raise FormatError("must not be empty")
    if fmt.kind is FormatKind.REGEX:
        return LLMatcher.grammar_from_regex(fmt.spec)
    if fmt.kind is FormatKind.GBNF:
        try:
            return LLMatcher.grammar_from_lark(gbnf_to_lark(fmt.spec))
        except Exception as exc:  # noqa: BLE001 - the converter raises several kinds; all mean the same
            raise FormatError(f"is not a GBNF grammar: {exc}") from None
    return LLMatcher.grammar_from_lark(fmt.spec)


@lru_cache(maxsize=256)
def compiled(fmt: ResponseFormat) -> str:
    """The grammar of `fmt`, checked by llguidance (without a tokenizer); raises FormatError
    with the compiler's message. Cached by format."""
    from llguidance import LLMatcher

    grammar = grammar_text(fmt)
    error = LLMatcher.validate_grammar(grammar, limits=parser_limits())
    if error:
        raise FormatError(error)
    return grammar
