"""The inference engine as a library: sequences and their scheduling, the KV cache, the model
runners, attention and sampling. It imports no gRPC; the worker service hosts it."""

from .driver import EngineDriver
from .engine import Engine, EngineEvents, EngineStats, Runner
from .sequence import Sequence

__all__ = ["Engine", "EngineDriver", "EngineEvents", "EngineStats", "Runner", "Sequence"]
