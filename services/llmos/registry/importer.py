"""Brings model weights into the model store and describes them for the catalog."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from llmos.common.errors import FailedPrecondition, InvalidArgument

from .sources import SourcePolicy
from .weights import PICKLE_SUFFIXES, WeightFacts, read_config, read_facts, safetensors_files, sha256_files

log = logging.getLogger(__name__)

# Files a model directory may carry besides its weights; anything else is left behind.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
               "merges.txt", "added_tokens.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "1_Pooling/config.json")


@dataclass(frozen=True)
class Imported:
    digest: str
    source_format: str
    path: Path
    facts: WeightFacts


class Importer:
    """Copies safetensors directories and converts GGUF files (and, when allowed, pickle
    weights) into `store`/<digest>."""

    def __init__(self, store: Path, policy: SourcePolicy, allow_pickle: bool = False,
                 python: str = sys.executable, conversion_cache: Path | None = None) -> None:
        self.store = store
        self.policy = policy
        self.allow_pickle = allow_pickle
        self.python = python
        # Conversions kept across stores (by source digest and converter), a build cache: a
        # store made again (a test's, a new data directory) takes the files instead of converting.
        self.conversion_cache = conversion_cache
        store.mkdir(parents=True, exist_ok=True)

    def resolve(self, source: str) -> Path:
        return self.policy.resolve(source)

    def source_digest(self, path: Path, task: str = "") -> tuple[str, str]:
        """(format, digest) of a source, computed before anything is copied or converted; refused
        when llmos cannot serve it for `task` (empty: what its files say)."""
        if path.is_dir():
            pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if self.allow_pickle and pickles and not any(path.glob("*.safetensors")):
                source_format, weights = "pickle", pickles
            else:
                source_format, weights = "safetensors", safetensors_files(path)
            read_config(path, task)     # what llmos cannot serve goes no further
            # The weights and the files beside them that define the model (its config, tokenizer
            # and chat template): the same weights under another config are another model.
            sides = [path / name for name in _SIDE_FILES if (path / name).is_file()]
            return source_format, sha256_files(weights + sides)
        if path.suffix == ".gguf":
            return "gguf", sha256_files([path])
        if path.suffix in PICKLE_SUFFIXES:
            raise InvalidArgument.field("source", "is a pickle file; import its model directory "
                                        "(with allow_pickle on) or a safetensors one",
                                        reason="PICKLE_WEIGHTS_REFUSED")
        raise InvalidArgument.field("source", "must be a safetensors directory or a .gguf file",
                                    reason="UNKNOWN_MODEL_FORMAT")

    async def bring_in(self, path: Path, source_format: str, digest: str, task: str = "") -> Imported:
        """Puts the weights in the store (unless already there) and reads their facts."""
        async def fill(staging: Path) -> None:
            if source_format in ("gguf", "pickle"):
                await self._converted(source_format, path, staging, digest)
            else:
                await asyncio.to_thread(self._copy_dir, path, staging)
            await asyncio.to_thread(index_added_tokens, staging)

        target = await self._stored(digest, fill)
        facts = await asyncio.to_thread(read_facts, target, task)
        return Imported(digest, source_format, target, facts)

    async def bring_in_adapter(self, files: list[Path], digest: str) -> Path:
        """Copies a LoRA adapter's `files` into the store (unless already there)."""
        async def fill(staging: Path) -> None:
            staging.mkdir(parents=True)
            for file in files:
                await asyncio.to_thread(shutil.copyfile, file, staging / file.name)

        return await self._stored(digest, fill)

    async def _stored(self, digest: str, fill: Callable[[Path], Awaitable[None]]) -> Path:
        """The store's directory for `digest`, made by `fill` in a staging directory and renamed
        into place unless it is there already (another import of the same files may finish first)."""
        target = self.store / digest.removeprefix("sha256:")
        if not target.exists():
            staging = target.with_name(target.name + f".staging-{time.monotonic_ns()}")
            try:
                await fill(staging)
                try:
                    staging.rename(target)
                except OSError:
                    if not target.is_dir():
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target

    def remove(self, path: str) -> None:
        """Deletes a model directory from the store (never anything outside it)."""
        target = Path(path).resolve()
        if target.parent == self.store.resolve():
            shutil.rmtree(target, ignore_errors=True)

    @staticmethod
    def _copy_dir(source: Path, target: Path) -> None:
        target.mkdir(parents=True)
        for path in safetensors_files(source):
            shutil.copyfile(path, target / path.name)
        for name in _SIDE_FILES:
            if (source / name).is_file():
                (target / name).parent.mkdir(exist_ok=True)
                shutil.copyfile(source / name, target / name)

    async def _converted(self, kind: str, source: Path, target: Path, digest: str) -> None:
        """`source` converted into `target`, from the conversion cache when it has it."""
        if self.conversion_cache is None:
            await self._convert(kind, source, target)
            return
        converter = _converter_key()
        cached = self.conversion_cache / f"{digest.removeprefix('sha256:')}-{converter}"
        if cached.is_dir():
            await asyncio.to_thread(_link_or_copy_tree, cached, target)
            log.info("%s of %s taken from the conversion cache", kind, source.name)
            return
        await self._convert(kind, source, target)
        partial = cached.with_name(cached.name + f".partial-{time.monotonic_ns()}")
        try:
            await asyncio.to_thread(_link_or_copy_tree, target, partial)
            partial.rename(cached)
        except OSError as exc:          # a cache that cannot be written is no cache: go on
            log.warning("the conversion cache %s is not written: %s", self.conversion_cache, exc)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    async def _convert(self, kind: str, source: Path, target: Path) -> None:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            self.python, "-m", "llmos.registry.to_safetensors", kind, str(source), str(target),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await process.communicate()
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            log.error("%s conversion of %s failed:\n%s", kind, source, stderr.decode(errors="replace")[-4000:])
            raise FailedPrecondition(f"could not convert the {kind} weights of {source.name}",
                                     reason=f"{kind.upper()}_CONVERSION_FAILED")
        log.info("converted %s (%s) to safetensors in %.1fs", source.name, kind, time.monotonic() - started)


def _converter_key() -> str:
    """What a conversion's output depends on besides its source: the converter's code and the
    libraries it reads GGUF and pickle weights with."""
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).with_name("to_safetensors.py").read_bytes())
    for package in ("transformers", "gguf", "torch"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.hexdigest()[:16]


def index_added_tokens(directory: Path) -> None:
    """Copies tokenizer.json's added tokens into tokenizer_config.json as `added_tokens_decoder`
    (what transformers itself writes there), so that loading the tokenizer need not parse the
    whole tokenizer.json in Python to find them. Nothing changes when either file is missing
    or the index is already there."""
    config_path, tokenizer_path = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if not (config_path.is_file() and tokenizer_path.is_file()):
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return
    added = json.loads(tokenizer_path.read_text(encoding="utf-8")).get("added_tokens") or []
    config["added_tokens_decoder"] = {
        str(token["id"]): {key: value for key, value in token.items() if key != "id"} for token in added}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _link_or_copy_tree(source: Path, target: Path) -> None:
    """`source`'s files in a new directory `target`: the weights hard-linked where one file system
    holds both (they are never written again), the small files beside them copied."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        try:
            if path.suffix != ".safetensors":
                raise OSError("copied")
            os.link(path, target / path.name)
        except OSError:
            shutil.copyfile(path, target / path.name)
