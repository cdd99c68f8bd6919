"""Tool calling: the functions a chat offers, checked once (gateway and worker alike); the grammar
that keeps every call the model writes well formed; and the formats models write calls in,
parsed back into calls as the text streams.

A model writes calls in its chat template's format (`FORMATS`, chosen by `format_of` from the
template's text). A template that shows no tools gets llmos's own prompt (`own_prompt`), which
presents them in the "hermes" format. With `auto`, the grammar lets the model write any text,
and from the moment it opens a call the call must be whole and valid: a function's name and
arguments that validate against its schema. With `required` or a named function it must start
with a call. So every call llmos emits parses and validates; the parser turns what the model
wrote back into `ToolCall`s, and text it cannot read as a call (a generation cut by its length
inside one) stays text, never lost.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from functools import lru_cache

from .domain import Tool, ToolCall, ToolMode, Tools
from .formats import JSON_OPTIONS, MAX_FORMAT_BYTES, MAX_SCHEMA_DEPTH, FormatError, parser_limits

MAX_TOOLS = 128
MAX_DESCRIPTION_CHARS = 4096
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolFormat:
    """How a family of models writes a call: `opener` starts one in running text (empty: the
    output is a call when it starts with "{"), `closer` ends it (empty: the output's end), and
    the key that holds the arguments."""

    name: str
    opener: str
    closer: str
    arguments: str


FORMATS = {
    # Qwen 2/2.5/3, Hermes 2/3 and llmos's own prompt: <tool_call>\n{"name": .., "arguments": ..}\n</tool_call>
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments"),
    # Llama 3.1-3.3's JSON tool calling: {"name": .., "parameters": ..}, several joined by "; ".
    "llama3_json": ToolFormat("llama3_json", "", "", "parameters"),
    # Mistral's: [TOOL_CALLS][{"name": .., "arguments": ..}, ...]
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments"),
}


def format_of(chat_template: str | None) -> str:
    """The tool-call format of a model with this chat template ("" without one)."""
    if not chat_template:
        return ""
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or ("tools" in chat_template and '"parameters"' in chat_template):
        return "llama3_json"
    return "hermes"


def template_shows_tools(chat_template: str | None) -> bool:
    """Whether the template renders a `tools` list itself (else llmos's own prompt does)."""
    return bool(chat_template) and "tools" in chat_template


# --- checking a request's tools ---------------------------------------------------------------

def _depth(value: object, level: int = 1) -> int:
    if isinstance(value, dict):
        return max([level] + [_depth(v, level + 1) for v in value.values()])
    if isinstance(value, list):
        return max([level] + [_depth(v, level + 1) for v in value])
    return level


@lru_cache(maxsize=1024)
def parameters_schema(parameters: str) -> dict:
    """A function's parameters as a schema object, checked: JSON, an object, within the size and
    depth limits, and compiled by llguidance; raises FormatError with the reason."""
    from llguidance import LLMatcher

    if not parameters:
        return {"type": "object"}
    if len(parameters.encode()) > MAX_FORMAT_BYTES:
        raise FormatError(f"is larger than {MAX_FORMAT_BYTES // 1024} KiB")
    try:
        schema = json.loads(parameters)
    except json.JSONDecodeError as exc:
        raise FormatError(f"is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise FormatError("must be a JSON Schema object")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise FormatError(f"is nested more than {MAX_SCHEMA_DEPTH} deep")
    if schema.get("type", "object") != "object":
        raise FormatError("must describe an object (the arguments), its type \"object\"")
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, JSON_OPTIONS)
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    error = LLMatcher.validate_grammar(grammar, limits=parser_limits())
    if error:
        raise FormatError(error)
    return schema


def check_tools(tools: Tools, add) -> None:
    """Adds a violation (`add(field, description)`) for each thing wrong with `tools`."""
    if len(tools.functions) > MAX_TOOLS:
        add("tools", f"at most {MAX_TOOLS} tools are allowed, got {len(tools.functions)}")
        return
    names = set()
    for i, tool in enumerate(tools.functions):
        if not NAME.fullmatch(tool.name):
            add(f"tools[{i}].name", "must be 1 to 64 letters, digits, '_' or '-'")
        elif tool.name in names:
            add(f"tools[{i}].name", f"{tool.name!r} is named twice")
        names.add(tool.name)
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            add(f"tools[{i}].description", f"is longer than {MAX_DESCRIPTION_CHARS} characters")
        try:
            parameters_schema(tool.parameters)
        except FormatError as exc:
            add(f"tools[{i}].parameters", str(exc)[:300])
    if tools.mode is ToolMode.FUNCTION and tools.function not in names:
        add("tool_choice.function", f"names {tools.function!r}, which is not one of the request's tools")
    if tools.mode in (ToolMode.REQUIRED, ToolMode.FUNCTION) and not tools.functions:
        add("tool_choice", "needs tools")


# --- the grammar ------------------------------------------------------------------------------

def _call_schema(tools: Tools, style: ToolFormat) -> dict:
    chosen = [t for t in tools.functions if tools.mode is not ToolMode.FUNCTION or t.name == tools.function]
    branches = [{"type": "object", "properties": {"name": {"const": t.name},
                                                  style.arguments: parameters_schema(t.parameters)},
                 "required": ["name", style.arguments], "additionalProperties": False} for t in chosen]
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {**schema, "x-guidance": JSON_OPTIONS}


def grammar(tools: Tools, fmt: str) -> str:
    """The Lark grammar (llguidance's) of the output: with AUTO any text, or text and then calls
    (from the moment a call opens, only a whole valid call); with REQUIRED or a named function,
    calls only. Parallel calls when `tools.parallel`."""
    style = FORMATS[fmt]
    forced = tools.mode in (ToolMode.REQUIRED, ToolMode.FUNCTION)
    call = f"%json {json.dumps(_call_schema(tools, style))}"
    lines = ["%llguidance {}"]
    if fmt == "hermes":
        more = '("\\n" "<tool_call>" body)*' if tools.parallel else ""
        lines += [f'body: "\\n" {call} "\\n</tool_call>"',
                  f'start: "<tool_call>" body {more}' if forced else f"start: TEXT | lead body {more}",
                  'lead[lazy]: /(.|\\n)*/ "<tool_call>"', "TEXT: /(.|\\n)*/"]
    elif fmt == "mistral":
        more = '(", " args)*' if tools.parallel else ""
        lines += [f"args: {call}", f'body: "[" args {more} "]"',
                  'start: "[TOOL_CALLS]" body' if forced else "start: TEXT | lead body",
                  'lead[lazy]: /(.|\\n)*/ "[TOOL_CALLS]"', "TEXT: /(.|\\n)*/"]
    else:
        more = '("; " args)*' if tools.parallel else ""
        lines += [f"args: {call}", f"start: args {more}" if forced else f"start: TEXT | args {more}",
                  "TEXT: /([^{](.|\\n)*)?/"]
    return "\n".join(lines) + "\n"


# --- llmos's own prompt, for templates that show no tools ------------------------------------

def own_prompt(tools: Tools) -> str:
    """The system text that presents `tools` to a model whose template does not (hermes format)."""
    listed = "\n".join(json.dumps({"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": parameters_schema(t.parameters)}},
        ensure_ascii=False) for t in tools.functions)
    must = {ToolMode.REQUIRED: "You must call at least one function.\n",
            ToolMode.FUNCTION: f"You must call the function {tools.function}.\n"}.get(tools.mode, "")
    return ("You can call functions to help with the user's request. They are listed, one JSON object "
            f"each, between <tools> and </tools>:\n<tools>\n{listed}\n</tools>\n{must}"
            "To call one, write a JSON object with its name and arguments between <tool_call> and "
            "</tool_call>, like this:\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": "
            "{<arguments as JSON>}}\n</tool_call>")


def call_text(call: ToolCall) -> str:
    """A call as the hermes format writes it (an earlier assistant turn, in llmos's own prompt)."""
    return f'<tool_call>\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments or "{}"}}}\n</tool_call>'


def answer_text(content: str) -> str:
    """A tool's result as llmos's own prompt presents it to the model."""
    return f"<tool_response>\n{content}\n</tool_response>"


# --- parsing what the model wrote ------------------------------------------------------------

class CallParser:
    """Splits a streamed output into text and tool calls. `push` takes the new text and returns
    the text that is plainly text (holding back what may open a call) and the calls completed;
    `finish` returns the rest once the output ended."""

    def __init__(self, fmt: str) -> None:
        self.style = FORMATS[fmt]
        self._held = ""
        self._inside = False
        self._started = False          # (llama3_json) whether the output's first character came
        self.calls = 0

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._held += text
        if not self.style.opener:
            return self._push_json()
        out, calls = "", []
        while True:
            if not self._inside:
                if self.calls:          # what separates calls is not text
                    self._held = self._held.lstrip()
                at = self._held.find(self.style.opener)
                if at < 0:
                    keep = _prefix_tail(self._held, self.style.opener)
                    cut = len(self._held) - keep
                    out, self._held = out + self._held[:cut], self._held[cut:]
                    return out, calls
                out += self._held[:at]
                self._held, self._inside = self._held[at + len(self.style.opener):], True
            if not self.style.closer:
                return out, calls
            end = self._held.find(self.style.closer)
            if end < 0:
                return out, calls
            body, self._held = self._held[:end], self._held[end + len(self.style.closer):]
            parsed = self._parse(body)
            if parsed is None:
                out += self.style.opener + body + self.style.closer
            else:
                calls += parsed
            self._inside = False

    def _push_json(self) -> tuple[str, list[ToolCall]]:
        if not self._started:
            stripped = self._held.lstrip()
            if not stripped:
                return "", []
            self._started, self._inside = True, stripped.startswith("{")
        if self._inside:
            return "", []
        out, self._held = self._held, ""
        return out, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self._held = self._held, ""
        if not self._inside:
            return rest, []
        parsed = self._parse(rest)
        if parsed is None:
            return self.style.opener + rest, []
        return "", parsed

    def _parse(self, body: str) -> list[ToolCall] | None:
        """The calls in one call's text (the mistral format's: a list; llama3_json's: objects
        joined by ";"), or None when it is not a call."""
        decoder, items, at, body = json.JSONDecoder(), [], 0, body.strip()
        try:
            while at < len(body):
                value, at = decoder.raw_decode(body, at)
                items += value if isinstance(value, list) else [value]
                while at < len(body) and body[at] in " \n;":
                    at += 1
        except json.JSONDecodeError:
            return None
        calls = []
        for item in items:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get(self.style.arguments), dict)):
                return None
            calls.append(ToolCall(new_call_id(), item["name"],
                                  json.dumps(item[self.style.arguments], ensure_ascii=False)))
        self.calls += len(calls)
        return calls or None


def _prefix_tail(text: str, opener: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `opener`."""
    for n in range(min(len(opener) - 1, len(text)), 0, -1):
        if text.endswith(opener[:n]):
            return n
    return 0


def tool_from_openai(entry: object, i: int, add) -> Tool | None:
    """One entry of OpenAI's `tools` list (type "function"), or None with a violation added."""
    function = entry.get("function") if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or entry.get("type", "function") != "function" or not isinstance(function, dict):
        add(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {\"name\", \"parameters\"...}}")
        return None
    name, description = function.get("name"), function.get("description") or ""
    parameters = function.get("parameters")
    if not isinstance(name, str) or not isinstance(description, str):
        add(f"tools[{i}].function", "needs a name (and a description, if any) as strings")
        return None
    if parameters is not None and not isinstance(parameters, dict):
        add(f"tools[{i}].function.parameters", "must be a JSON Schema object")
        return None
    return Tool(name, description, json.dumps(parameters) if parameters is not None else "")
