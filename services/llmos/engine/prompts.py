"""A request's input as token ids: a prompt as it is, messages through the model's chat template.

The text of a message is text. A chat template marks turns with the tokenizer's special tokens
(`<|im_start|>`, `<|eot_id|>`, ...); when a message's content holds the same strings, they are
tokenized as the plain characters they are, never as the control tokens, so no user can open a
system turn or end one with what they write. The template's own markers stay control tokens.
A message without any special token's text is tokenized exactly as the rendered template is
(the common case, and the same ids as before this rule). A raw `prompt` is the caller's whole
input, template included, and is tokenized as it is.

A chat's tools are shown by the template when it renders a `tools` list (Qwen, Llama 3.1,
Mistral, Hermes), with the earlier turns' calls and the tools' answers as it expects them; a
template that shows no tools gets llmos's own system prompt presenting them, its calls written
into the assistant turns and the tools' answers as user turns (`llmos.common.tools`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llmos.common.domain import ChatMessage, GenerationInput
from llmos.common.errors import InvalidArgument
from llmos.common.tools import answer_text, call_text, own_prompt, parameters_schema, template_shows_tools


def special_strings(tokenizer: Any) -> list[str]:
    """The text of every special token of `tokenizer` (longest first)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added))
    return sorted((s for s in specials if s), key=len, reverse=True)


def prompt_ids(tokenizer: Any, source: GenerationInput, specials: list[str] | None = None) -> list[int]:
    """The token ids of `source`; messages need a chat template (the caller checks)."""
    if source.prompt is not None:
        return tokenizer(source.prompt, add_special_tokens=True)["input_ids"]
    messages, tools = chat(tokenizer, source)
    specials = special_strings(tokenizer) if specials is None else specials
    if not any(s in m["content"] for m in messages for s in specials):
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # Each content becomes a marker the template places; the pieces between markers are the
    # template's (their special tokens count), the contents are tokenized as plain text.
    markers = [f"\x1e{uuid.uuid4().hex}{i}\x1e" for i in range(len(messages))]
    marked = [{**m, "content": marker} for m, marker in zip(messages, markers, strict=True)]
    text = tokenizer.apply_chat_template(marked, tools=tools, add_generation_prompt=True, tokenize=False)
    ids: list[int] = []
    for marker, message in zip(markers, messages, strict=True):
        before, found, text = text.partition(marker)
        if not found:       # the template changes contents: their control strings cannot be kept apart
            raise InvalidArgument.field(
                "messages", "holds the text of a special token, and this model's chat template does not "
                "place message contents as they are, so it cannot be kept as text", reason="SPECIAL_TOKEN_IN_CONTENT")
        ids += tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids += tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return ids


def _native(message: ChatMessage) -> dict:
    """A message as templates that show tools take it (OpenAI's shape, arguments as objects)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": json.loads(c.arguments or "{}")}}
                             for c in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _own(message: ChatMessage) -> dict:
    """A message as llmos's own tool prompt writes it for a template that shows no tools."""
    if message.role == "tool":
        return {"role": "user", "content": answer_text(message.content)}
    content = "\n".join([message.content] * bool(message.content) + [call_text(c) for c in message.tool_calls])
    return {"role": message.role, "content": content}


def chat(tokenizer: Any, source: GenerationInput) -> tuple[list[dict], list[dict] | None]:
    """The messages as the chat template takes them, and the tools it is given (None: none)."""
    native = template_shows_tools(tokenizer.chat_template)
    messages = [(_native if native else _own)(m) for m in source.messages]
    offered = source.tools if source.tools is not None and source.tools.offered else None
    if offered is None:
        return messages, None
    if native:
        return messages, [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                            "parameters": parameters_schema(t.parameters)}}
                          for t in offered.functions]
    prompt = own_prompt(offered)
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages, None
