"""A sentence encoder with a linear head on its mean-pooled output, for LoRA classifiers.

Why not ``AutoModelForSequenceClassification``: that head reads the ``[CLS]`` token through a
pooler, but sentence-transformers encoders such as all-MiniLM-L6-v2 were trained to be read by
mean pooling; their ``[CLS]`` carries little. Reading the encoder the way it was trained gives
the LoRA adapter a head that starts useful (it is initialised by logistic regression on the
frozen embeddings) instead of random, which is what makes training fit in minutes on a CPU.
Imported lazily: it needs torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    def __init__(self, encoder_path: str, num_labels: int) -> None:
        super().__init__()
        from transformers import AutoModel

        from bot.models.loading import LOAD_LOCK

        with LOAD_LOCK:  # see LOAD_LOCK: concurrent loads can leave meta tensors
            self.encoder = AutoModel.from_pretrained(encoder_path)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)
        # peft reads ``config`` (model type, tied weights) from the model it wraps.
        self.config = self.encoder.config

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        logits = self.head(self.embed(input_ids, attention_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def lora_targets() -> list[str]:
    """All linear layers of a BERT-style encoder (the peft "all-linear" choice)."""
    return ["query", "key", "value", "dense"]
