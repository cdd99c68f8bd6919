"""The pooling routes of the HTTP door, in the shapes their clients send: OpenAI's
`/v1/embeddings` (`input` a string or a list, `encoding_format` float or base64, `dimensions`),
and vLLM's `/v1/classify`, `/v1/score` (`text_1`, `text_2`) and `/v1/rerank` (Jina's and
Cohere's: `query`, `documents`, `top_n`). Each body becomes a `PoolingInput` (and back from the
chunk that answers it); vLLM's `truncate_prompt_tokens` is honoured everywhere."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

from llmos.common.domain import Chunk, PoolingInput
from llmos.common.errors import InvalidArgument


def _texts(value: Any, name: str, allow_objects: bool = False) -> tuple[str, ...]:
    """A string or a list of strings (Cohere's documents may be {"text": ...} objects)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        out = []
        for i, item in enumerate(value):
            if allow_objects and isinstance(item, dict) and isinstance(item.get("text"), str):
                item = item["text"]
            if not isinstance(item, str):
                raise InvalidArgument.field(f"{name}[{i}]", "must be a string (token arrays are not supported)")
            out.append(item)
        return tuple(out)
    raise InvalidArgument.field(name, "must be a string or a non-empty array of strings")


def _integer(body: dict, name: str, default: int = 0) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**31:
        raise InvalidArgument.field(name, "must be an integer")
    return value


def _model(body: Any) -> str:
    if not isinstance(body, dict):
        raise InvalidArgument.field("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument.field("model", "is required")
    return model


def embeddings_request(body: Any) -> tuple[str, PoolingInput, str]:
    """(model, input, encoding format) of an OpenAI embeddings body."""
    model = _model(body)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidArgument.field("encoding_format", "must be float or base64")
    return model, PoolingInput("embed", _texts(body.get("input"), "input"), (),
                               _integer(body, "truncate_prompt_tokens"), _integer(body, "dimensions")), encoding


def classify_request(body: Any) -> tuple[str, PoolingInput]:
    model = _model(body)
    return model, PoolingInput("classify", _texts(body.get("input"), "input"), (),
                               _integer(body, "truncate_prompt_tokens"))


def score_request(body: Any) -> tuple[str, PoolingInput]:
    """vLLM's score body: `text_1` one text or a list, `text_2` one text or a list; one text
    against each of the others, or list against list pair by pair."""
    model = _model(body)
    first, second = _texts(body.get("text_1"), "text_1"), _texts(body.get("text_2"), "text_2")
    if len(first) == 1:
        first = first * len(second)
    elif len(second) == 1:
        second = second * len(first)
    if len(first) != len(second):
        raise InvalidArgument.field("text_2", f"holds {len(second)} texts for the {len(first)} of text_1")
    return model, PoolingInput("score", first, second, _integer(body, "truncate_prompt_tokens"))


def rerank_request(body: Any) -> tuple[str, PoolingInput, int | None, bool]:
    """(model, input, top_n, return_documents) of a Jina or Cohere rerank body."""
    model = _model(body)
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise InvalidArgument.field("query", "is required (a string)")
    documents = _texts(body.get("documents"), "documents", allow_objects=True)
    top = body.get("top_n")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InvalidArgument.field("top_n", "must be a positive integer")
    pooling = PoolingInput("score", (query,) * len(documents), documents, _integer(body, "truncate_prompt_tokens"))
    return model, pooling, top, body.get("return_documents", True) is not False


def _usage(chunk: Chunk) -> dict:
    tokens = chunk.usage.prompt_tokens if chunk.usage else 0
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def embeddings_response(version: str, chunk: Chunk, encoding: str) -> dict:
    def encoded(row: list[float]) -> list[float] | str:
        if encoding == "base64":        # little-endian float32, as OpenAI's SDKs decode it
            return base64.b64encode(struct.pack(f"<{len(row)}f", *row)).decode()
        return row
    return {"object": "list", "model": version, "usage": _usage(chunk),
            "data": [{"object": "embedding", "index": i, "embedding": encoded(row)}
                     for i, row in enumerate(chunk.pooled.rows)]}


def classify_response(version: str, request_id: str, chunk: Chunk) -> dict:
    labels = chunk.pooled.labels
    return {"id": f"classify-{request_id}", "object": "list", "created": int(time.time()), "model": version,
            "usage": _usage(chunk),
            "data": [{"index": i, "label": labels[max(range(len(row)), key=row.__getitem__)], "probs": row,
                      "num_classes": len(row)} for i, row in enumerate(chunk.pooled.rows)]}


def score_response(version: str, request_id: str, chunk: Chunk) -> dict:
    return {"id": f"score-{request_id}", "object": "list", "created": int(time.time()), "model": version,
            "usage": _usage(chunk),
            "data": [{"index": i, "object": "score", "score": row[0]} for i, row in enumerate(chunk.pooled.rows)]}


def rerank_response(version: str, chunk: Chunk, documents: tuple[str, ...], top: int | None,
                    with_documents: bool) -> dict:
    ranked = sorted(range(len(documents)), key=lambda i: -chunk.pooled.rows[i][0])[:top]
    results = []
    for i in ranked:
        result: dict[str, Any] = {"index": i, "relevance_score": chunk.pooled.rows[i][0]}
        if with_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": version,
            "usage": {"total_tokens": _usage(chunk)["total_tokens"]}, "results": results}
