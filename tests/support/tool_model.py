"""A tiny model that calls a tool of its own accord: the tiny random Llama (with a longer context),
taught in a few hundred steps one conversation as llmos renders it. Asked the weather in Paris
with a `get_weather` tool offered (auto, required or named), it calls the tool; given the
tool's answer, it says it. Nothing is downloaded; the same seed gives the same model."""

from __future__ import annotations

import json
from pathlib import Path

from llmos.common.domain import ChatMessage, GenerationInput, Tool, ToolCall, ToolMode, Tools

QUESTION = "What is the weather in Paris?"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32}},
                   "required": ["city"], "additionalProperties": False}}}
ARGUMENTS = {"city": "Paris"}
RESULT = "sunny, 21 C"
ANSWER = "It is sunny in Paris."
STEPS = 150


def weather_tools(mode: ToolMode, parallel: bool = True) -> Tools:
    f = WEATHER["function"]
    return Tools((Tool(f["name"], f["description"], json.dumps(f["parameters"])),), mode,
                 f["name"] if mode is ToolMode.FUNCTION else "", parallel)


def conversations() -> list[tuple[GenerationInput, str]]:
    """Each prompt the model is taught, with the answer it learns."""
    ask = (ChatMessage("user", QUESTION),)
    call = ToolCall("call_0", "get_weather", json.dumps(ARGUMENTS))
    answered = ask + (ChatMessage("assistant", "", (call,)), ChatMessage("tool", RESULT, tool_call_id="call_0"))
    call_text = f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(ARGUMENTS)}}}\n</tool_call>'
    taught = []
    for mode in (ToolMode.AUTO, ToolMode.REQUIRED, ToolMode.FUNCTION):
        for parallel in (True, False):
            taught.append((GenerationInput(messages=ask, tools=weather_tools(mode, parallel)), call_text))
    taught.append((GenerationInput(messages=answered, tools=weather_tools(ToolMode.AUTO)), ANSWER))
    taught.append((GenerationInput(messages=answered), ANSWER))
    return taught


def build_tool_model(directory: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.engine.prompts import prompt_ids
    from tests.support.tiny_model import build_tiny_model

    build_tiny_model(directory, context=2048)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    rows = []
    for source, answer in conversations():
        prompt = prompt_ids(tokenizer, source)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, target))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        ids[i, :len(prompt) + len(target)] = torch.tensor(prompt + target)
        labels[i, len(prompt):len(prompt) + len(target)] = torch.tensor(target)
        mask[i, :len(prompt) + len(target)] = 1
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():                      # it learnt them: each answer is its greedy answer
        for prompt, target in rows:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(target), do_sample=False)
            assert out[0, len(prompt):].tolist() == target, f"the tool model did not learn its answers ({loss})"
    model.save_pretrained(directory, safe_serialization=True)
    return directory
