"""memserve: the example LLM server built on mempool (model, engine; server and scheduler to come)."""

from __future__ import annotations

from .config import ModelConfig, ModelConfigError, preset
from .engine import Engine, EngineConfig, RequestOutput
from .model import LlamaModel
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import load_pretrained

__all__ = [
    "Engine",
    "EngineConfig",
    "LlamaModel",
    "ModelConfig",
    "ModelConfigError",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "load_pretrained",
    "preset",
]
