"""A request's input as token ids: a prompt as it is, messages through the model's chat template.

The text of a message is text. A chat template marks turns with the tokenizer's special tokens
(`<|im_start|>`, `<|eot_id|>`, ...); when a message's content holds the same strings, they are
tokenized as the plain characters they are, never as the control tokens, so no user can open a
system turn or end one with what they write. The template's own markers stay control tokens.
A message without any special token's text is tokenized exactly as the rendered template is
(the common case, and the same ids as before this rule). A raw `prompt` is the caller's whole
input, template included, and is tokenized as it is.
"""

from __future__ import annotations

import uuid
from typing import Any

from llmos.common.domain import GenerationInput
from llmos.common.errors import InvalidArgument


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
    messages = [{"role": m.role, "content": m.content} for m in source.messages]
    specials = special_strings(tokenizer) if specials is None else specials
    if not any(s in m["content"] for m in messages for s in specials):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # Each content becomes a marker the template places; the pieces between markers are the
    # template's (their special tokens count), the contents are tokenized as plain text.
    markers = [f"\x1e{uuid.uuid4().hex}{i}\x1e" for i in range(len(messages))]
    marked = [{**m, "content": marker} for m, marker in zip(messages, markers, strict=True)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
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
