"""Tool calls: the format a chat template implies, the grammar of each format (what it lets a
model write and what it refuses), the parser that turns streamed text back into calls, and the
two ways a chat with tools is rendered."""

from __future__ import annotations

import json

import pytest

from llmos.common.domain import ChatMessage, GenerationInput, Tool, ToolCall, ToolMode, Tools
from llmos.common.tools import FORMATS, CallParser, format_of, grammar
from llmos.engine.prompts import prompt_ids

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city"], "additionalProperties": False}
TOOLS = (Tool("get_weather", "weather", json.dumps(SCHEMA)), Tool("get_time", "", ""))


def call(fmt: str, name: str, arguments: dict) -> str:
    key = FORMATS[fmt].arguments
    body = json.dumps({"name": name, key: arguments})
    return {"hermes": f"<tool_call>\n{body}\n</tool_call>", "mistral": f"[TOOL_CALLS][{body}]",
            "llama3_json": body}[fmt]


def test_the_format_follows_the_chat_template():
    assert format_of(None) == "" and format_of("") == ""
    assert format_of("{% for tool in tools %}<tool_call>{% endfor %}") == "hermes"
    assert format_of("{{ '[AVAILABLE_TOOLS]' }}{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert format_of("{%- if tools %}<|python_tag|>{{ tools }}{% endif %}") == "llama3_json"
    assert format_of('{% if tools %}{"name": ..., "parameters": ...}{% endif %}') == "llama3_json"
    assert format_of("<|im_start|>{{ message['content'] }}") == "hermes"      # no tools: llmos's own prompt


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_parser_finds_each_call_however_the_text_is_cut(fmt):
    calls = [("get_weather", {"city": "Paris"}), ("get_time", {})]
    joiner = {"hermes": "\n", "llama3_json": "; ", "mistral": None}[fmt]
    if fmt == "mistral":
        body = "[TOOL_CALLS][" + ", ".join(json.dumps({"name": n, "arguments": a}) for n, a in calls) + "]"
    else:
        body = joiner.join(call(fmt, n, a) for n, a in calls)
    text = ("Let me look. " if fmt != "llama3_json" else "") + body
    for size in (1, 3, len(text)):
        parser, out, found = CallParser(fmt), "", []
        for at in range(0, len(text), size):
            piece, made = parser.push(text[at:at + size])
            out, found = out + piece, found + made
        piece, made = parser.finish()
        out, found = out + piece, found + made
        assert out == ("Let me look. " if fmt != "llama3_json" else "")
        assert [(c.name, json.loads(c.arguments)) for c in found] == calls
        assert all(c.id.startswith("call_") and len(c.id) == 29 for c in found)
        assert len({c.id for c in found}) == 2


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_text_that_is_not_a_whole_call_stays_text(fmt):
    cut = call(fmt, "get_weather", {"city": "Paris"})[:-4]          # the generation ran out inside it
    for text in ("Just text, no call.", cut):
        parser = CallParser(fmt)
        out, calls = parser.push(text)
        rest, more = parser.finish()
        assert (out + rest, calls + more) == (text, [])


@pytest.fixture(scope="module")
def matcher(tiny_tokenizer):
    import llguidance.hf
    from llguidance import LLMatcher

    llg = llguidance.hf.from_tokenizer(tiny_tokenizer, n_vocab=len(tiny_tokenizer),
                                       eos_token=[tiny_tokenizer.eos_token_id])

    def accepts(tools: Tools, fmt: str, text: str) -> bool:
        m = LLMatcher(llg, LLMatcher.grammar_from_lark(grammar(tools, fmt)), log_level=0)
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        return all(m.consume_token(t) for t in ids) and not m.is_error() and m.is_accepting()
    return accepts


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_formats_grammar_lets_through_only_whole_valid_calls(matcher, fmt):
    auto, required = Tools(TOOLS, ToolMode.AUTO), Tools(TOOLS, ToolMode.REQUIRED)
    named = Tools(TOOLS, ToolMode.FUNCTION, "get_time")
    good = call(fmt, "get_weather", {"city": "Rome", "days": 3})
    for tools in (auto, required):
        assert matcher(tools, fmt, good)
        assert not matcher(tools, fmt, call(fmt, "get_wether", {"city": "Rome"}))           # no such function
        assert not matcher(tools, fmt, call(fmt, "get_weather", {"city": "Rome", "days": 9}))   # out of range
        assert not matcher(tools, fmt, call(fmt, "get_weather", {"town": "Rome"}))          # not its schema
    assert matcher(auto, fmt, "It is sunny.")
    assert not matcher(required, fmt, "It is sunny.")
    assert matcher(named, fmt, call(fmt, "get_time", {})) and not matcher(named, fmt, good)
    if fmt == "hermes":          # in running text, once a call opens it must be whole
        assert matcher(auto, fmt, "Let me see. " + good)
        assert not matcher(auto, fmt, "Let me see. <tool_call>\nnot json")
    parallel = {"hermes": good + "\n" + good, "llama3_json": good + "; " + good,
                "mistral": good[:-1] + ", " + good[len("[TOOL_CALLS]["):]}[fmt]
    assert matcher(required, fmt, parallel)
    assert not matcher(Tools(TOOLS, ToolMode.REQUIRED, parallel=False), fmt, parallel)


NATIVE = ("{%- if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{%- endif %}"
          "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
          "{%- if m.tool_call_id %} (for {{ m.tool_call_id }}){%- endif %}<|im_end|>\n{%- endfor %}"
          "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_a_template_that_shows_tools_gets_them_and_one_that_does_not_gets_llmos_prompt(tiny_tokenizer):
    turns = (ChatMessage("user", "Weather?"),
             ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
             ChatMessage("tool", "rain", tool_call_id="call_1"))
    source = GenerationInput(messages=turns, tools=Tools(TOOLS, ToolMode.AUTO))
    own = tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, source))
    assert "<tools>" in own and '"name": "get_weather"' in own and own.count("<|im_start|>system") == 1
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in own
    assert "<|im_start|>user\n<tool_response>\nrain\n</tool_response>" in own
    hidden = tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, GenerationInput(
        messages=turns, tools=Tools(TOOLS, ToolMode.NONE))))
    assert "<tools>" not in hidden and "get_time" not in hidden       # `none`: the tools are not shown
    tiny_tokenizer.chat_template, template = NATIVE, tiny_tokenizer.chat_template
    try:
        native = tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, source))
    finally:
        tiny_tokenizer.chat_template = template
    assert native.startswith("<|im_start|>system\nTOOLS [") and "<tools>" not in native
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in native
    assert "rain (for call_1)" in native
