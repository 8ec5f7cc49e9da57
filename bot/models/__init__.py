"""The model runtime: one base language model with named LoRA adapters, and embeddings."""

from bot.models.runtime import ModelRuntime
from bot.models.types import (
    ChatMessages,
    Generation,
    GenerationParams,
    Likelihood,
    ModelError,
    RuntimeBusy,
    ShuttingDown,
    UnknownAdapter,
)

__all__ = [
    "ChatMessages",
    "Generation",
    "GenerationParams",
    "Likelihood",
    "ModelError",
    "ModelRuntime",
    "RuntimeBusy",
    "ShuttingDown",
    "UnknownAdapter",
]
