"""Any transformers causal LM (with peft adapters) behind the interface the engine drives.

The engine (bot/models/local.py) talks to a *decoder*: ``decoder(input_ids, attention_mask,
position_ids, cache, adapters, last_only) -> logits``, ``new_cache(layers)``,
``load_adapter(path, name)``, ``delete_adapter(name)``, ``adapter_names()``,
``max_positions``, ``eos_token_ids``. chinwag's own Llama-family decoder
(bot/models/decoder.py) implements it natively; this wrapper gives every other architecture
transformers knows the same shape, with peft serving mixed adapters in one batch
(``adapter_names``, one adapter per row).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class TransformersDecoder:
    def __init__(self, model: Any) -> None:
        self.model = model
        self._peft = False
        forward = inspect.signature(type(model).forward).parameters
        self._cache_kw = (
            "past_key_values"
            if "cache" not in forward and "past_key_values" in forward
            else "cache"
        )

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list | tuple) else {int(eos)}

    def parameters(self) -> Iterator[Any]:
        return self.model.parameters()

    def named_modules(self) -> Iterator[tuple[str, Any]]:
        return self.model.named_modules()

    def new_cache(self, layers: list[tuple[Any, Any]] | None = None) -> Any:
        return growing_cache(layers)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        input_ids: Any,
        attention_mask: Any,
        position_ids: Any,
        cache: Any,
        adapters: list[str | None] | None = None,
        last_only: bool | int = False,
    ) -> Any:
        inputs: dict[str, Any] = {}
        if self._peft:  # importing peft costs seconds: only once an adapter was loaded
            inputs["adapter_names"] = [a or BASE for a in adapters or [None] * len(input_ids)]
        if last_only:
            inputs["logits_to_keep"] = int(last_only)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kw: cache},
            **inputs,
        )
        return out.logits

    # -- adapters ------------------------------------------------------------------------------

    def adapter_names(self) -> set[str]:
        return set(getattr(self.model, "peft_config", {}) or {}) if self._peft else set()

    def load_adapter(self, path: Path | str, name: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self._peft = True
        self.model.eval()

    def delete_adapter(self, name: str) -> None:
        if self._peft:
            self.model.delete_adapter(name)


def growing_cache(layers: list[tuple[Any, Any]] | None = None) -> Any:
    """A ``DynamicCache`` whose layers — given ones and any it adds — are growing layers."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()
    for layer in cache.layers:
        layer.__class__ = _growing_layer()
    cache.layer_class_to_replicate = _growing_layer()
    return cache


@functools.cache
def _growing_layer() -> type:
    """A KV cache layer that writes each step into spare room instead of concatenating.

    transformers' ``DynamicLayer`` copies the whole cache on every token (``torch.cat``) — 14 %
    of a 16-row decode step here. This one keeps a buffer with headroom and hands out views of
    its filled part; whenever the engine replaces the tensors (rows dropped, rows merged, left
    padding trimmed) the next update starts a fresh buffer from them.
    """
    from transformers.cache_utils import DynamicLayer

    from bot.models.decoder import grow

    class GrowingLayer(DynamicLayer):
        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            filled = self.keys is not None and self.keys.numel() > 0
            self.keys, self.values, self._kbuf, self._vbuf = grow(
                self.keys if filled else None,
                self.values if filled else None,
                getattr(self, "_kbuf", None),
                getattr(self, "_vbuf", None),
                key_states,
                value_states,
            )
            return self.keys, self.values

    return GrowingLayer
