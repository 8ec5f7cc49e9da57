"""A lean Llama-family decoder for serving: the engine's forward pass without transformers.

Why not ``LlamaForCausalLM`` itself: on the 2-core machine importing transformers' modeling
code costs 3–4 s of every start (it pulls in torch.distributed, dynamo, sympy and scipy), and
its forward pass spends a good part of a 16-row decode step on plumbing — mask builders, cache
objects, output dataclasses, per-projection matmuls. Serving engines (vLLM, llama.cpp) carry
their own model code for the same reasons. This one covers the Llama architecture (SmolLM2,
Llama 2/3, TinyLlama, Mistral without sliding window, Qwen2 with its qkv bias) and reads the
same ``config.json`` + safetensors folder that ``save_pretrained`` writes; anything else is
served by transformers, unchanged (bot/models/loading.py chooses).

What it does differently:

- q/k/v and gate/up are one matmul each (weights concatenated at load), so a decode step runs
  4 matmuls per layer instead of 7 — small matmuls are dominated by per-call overhead here;
- the KV cache grows in place (:class:`KVCache`), the attention mask is built once per step
  and shared by every layer;
- LoRA adapters in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``,
  as the trainers write them) apply per row, so one batch mixes adapters like peft's
  ``adapter_names`` does.

The weights, tokenizer and adapters are the ones transformers and peft use; outputs match
``LlamaForCausalLM`` (greedy tokens identical in fp32, tests/test_decoder.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

log = logging.getLogger("bot.models")

#: Model types whose checkpoints this module reads as they are.
ARCHITECTURES = {"llama", "mistral", "qwen2"}
#: Projections LoRA may target (peft's names, as in the checkpoint).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


#: peft options that change what a LoRA layer computes beyond ``x @ A.T @ B.T * scale``.
_UNSERVED = (
    "use_dora",
    "modules_to_save",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "lora_bias",
    "target_parameters",
    "use_qalora",
    "use_bdlora",
    "monteclora_config",
)


class Unsupported(ValueError):
    """The checkpoint needs something this decoder does not implement: use transformers."""


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    eos_token_id: tuple[int, ...]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DecoderConfig:
        kind = raw.get("model_type")
        if kind not in ARCHITECTURES:
            raise Unsupported(f"model_type {kind!r}")
        if raw.get("hidden_act", "silu") != "silu":
            raise Unsupported(f"activation {raw.get('hidden_act')!r}")
        if raw.get("mlp_bias"):
            raise Unsupported("mlp_bias")
        if kind == "mistral" and raw.get("sliding_window"):
            raise Unsupported("sliding-window attention")
        if kind == "qwen2" and raw.get("use_sliding_window"):
            raise Unsupported("sliding-window attention")
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise Unsupported(f"rope type {rope_type!r}")
        heads = int(raw["num_attention_heads"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", kind == "qwen2")),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            eos_token_id=eos_ids,
        )


# -- KV cache ---------------------------------------------------------------------------------


class CacheLayer:
    """One layer's keys and values, ``[batch, kv_heads, length, head_dim]``, growing in place.

    Appending a token into spare room instead of ``torch.cat`` saves copying the whole cache
    every step. ``keys``/``values`` are views of the filled part; the engine may replace them
    (rows dropped or merged, padding trimmed), and the next append then starts a new buffer.
    """

    __slots__ = ("_kbuf", "_vbuf", "keys", "values")

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        self.keys = keys
        self.values = values
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values, self._kbuf, self._vbuf = grow(
            self.keys, self.values, self._kbuf, self._vbuf, k, v
        )
        return self.keys, self.values


def grow(
    keys: torch.Tensor | None,
    values: torch.Tensor | None,
    kbuf: torch.Tensor | None,
    vbuf: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append ``k``/``v`` along the length axis into the buffers' spare room.

    Returns ``(keys, values, kbuf, vbuf)``: views of the filled part and the buffers behind
    them. A fresh buffer with headroom starts when there is none, the batch changed, it is
    full, or ``keys`` is no longer a view of it (the engine replaced the tensors). Shared by
    this module's cache and the one the transformers path uses.
    """
    have = 0 if keys is None else keys.shape[-2]
    new = k.shape[-2]
    if (
        kbuf is None
        or vbuf is None
        or kbuf.shape[0] != k.shape[0]
        or kbuf.shape[-2] < have + new
        or (keys is not None and have and keys.data_ptr() != kbuf.data_ptr())
    ):
        room = have + new + max(32, (have + new) // 2)
        b, h, _, d = k.shape
        kbuf = k.new_empty((b, h, room, d))
        vbuf = v.new_empty((b, h, room, v.shape[-1]))
        if keys is not None and values is not None and have:
            kbuf[:, :, :have] = keys
            vbuf[:, :, :have] = values
    kbuf[:, :, have : have + new] = k
    vbuf[:, :, have : have + new] = v
    return kbuf[:, :, : have + new], vbuf[:, :, : have + new], kbuf, vbuf


class KVCache:
    """The running batch's keys and values, one :class:`CacheLayer` per decoder layer."""

    def __init__(self, num_layers: int, layers: list[tuple[torch.Tensor, torch.Tensor]] | None):
        self.layers = (
            [CacheLayer(k, v) for k, v in layers]
            if layers
            else [CacheLayer() for _ in range(num_layers)]
        )

    def batch_select_indices(self, idx: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.keys is not None and layer.values is not None:
                layer.keys = layer.keys[idx]
                layer.values = layer.values[idx]


# -- LoRA -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _LoraPair:
    """One adapter's delta for one (possibly fused) projection: ``(x @ a.T) @ b.T``.

    For a fused projection the ``a`` of each part is stacked and ``b`` is block-diagonal, so
    the adapter costs two small matmuls per projection however many parts it targets.
    """

    a: torch.Tensor  # [rank_total, in]
    b: torch.Tensor  # [out, rank_total]  (scaling folded in)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    """A projection built around loaded weights (no random init: that alone costs a second).

    It may carry LoRA deltas (``lora``: adapter → pair) and the sizes of its fused parts
    (``parts``), and stays a plain ``nn.Linear`` — not a subclass — so the CPU fast paths
    (bot/models/cpu_linear.py) convert it like any other; hence ``Any`` to type checkers,
    which cannot see attributes set on an instance.
    """
    layer: Any = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.out_features, layer.in_features = weight.shape
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.register_parameter(
        "bias", None if bias is None else nn.Parameter(bias, requires_grad=False)
    )
    layer.lora = {}
    return layer


def _with_lora(layer: nn.Linear, x: torch.Tensor, rows: _Rows | None) -> torch.Tensor:
    out = layer(x)
    lora: dict[str, _LoraPair] | None = getattr(layer, "lora", None)
    if not lora or rows is None:
        return out
    for name, index in rows.groups:
        pair = lora.get(name)
        if pair is None:
            continue
        if index is None:  # the whole batch uses this adapter
            out = out + (x @ pair.a.T) @ pair.b.T
        else:
            out = out.index_add(0, index, (x[index] @ pair.a.T) @ pair.b.T)
    return out


@dataclass(slots=True)
class _Rows:
    """Which rows use which adapter in this forward: ``(name, index | None for all)``."""

    groups: list[tuple[str, torch.Tensor | None]]

    @classmethod
    def of(cls, adapters: list[str | None] | None, device: torch.device) -> _Rows | None:
        if not adapters or all(a is None for a in adapters):
            return None
        names = {a for a in adapters if a is not None}
        if len(names) == 1 and None not in adapters:
            return cls([(names.pop(), None)])
        groups: list[tuple[str, torch.Tensor | None]] = []
        for name in sorted(names):
            idx = [i for i, a in enumerate(adapters) if a == name]
            groups.append((name, torch.tensor(idx, device=device)))
        return cls(groups)


# -- the model --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = _native_for(x)
        if native is not None and x.dtype == self.weight.dtype:
            # One call for what is six ops below (15 µs for 16 rows, 61 norms a step).
            try:
                flat = x.view(-1, x.shape[-1])
                return native.rms_norm(flat, self.weight, self.eps).view(x.shape)
            except RuntimeError:
                _native_failed("RMS norm")
        # fp32 statistics, as transformers computes them: outputs match token for token.
        return F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype) * self.weight

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: the residual stream's next value and what the next
        block reads. Each block's output is added where the following norm reads it, so a
        decode step makes one native call there instead of an add and a norm (60 of each)."""
        if delta is None:
            return x, self(x)
        native = _native_for(x, delta)
        if native is not None and x.dtype == delta.dtype == self.weight.dtype:
            try:
                h = x.shape[-1]
                total, normed = native.add_rms_norm(
                    x.view(-1, h), delta.view(-1, h), self.weight, self.eps
                )
                return total.view(x.shape), normed.view(x.shape)
            except RuntimeError:
                _native_failed("RMS norm")
        x = x + delta
        return x, self(x)


def _silu_mul(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    """``silu(gate) * up`` of the fused gate/up projection's output: one native call in a
    decode step where PyTorch takes a split, a silu and a product (a tenth of a 16-row step's
    element-wise time went to ``aten::silu`` alone)."""
    native = _native_for(gate_up)
    if native is not None:
        try:
            flat = gate_up.view(-1, gate_up.shape[-1])
            return native.silu_mul(flat).view(*gate_up.shape[:-1], intermediate)
        except RuntimeError:
            _native_failed("SiLU")
    gate, up = gate_up.split(intermediate, -1)
    return F.silu(gate) * up


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the "rotate half" layout Llama checkpoints use)."""
    native = _native
    if (
        native is not None
        and x.device.type == "cpu"
        and x.shape[2] == 1
        and x.stride(-1) == 1
        and cos.stride(-1) == 1
        and sin.stride(-1) == 1
        and cos.dtype == sin.dtype == x.dtype
        and not torch.is_grad_enabled()
    ):
        try:
            return native.rotary(x, cos, sin)  # a decode step: one call for five ops
        except RuntimeError:
            _native_failed("rotary embedding")
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


#: chinwag's own decode-step kernels, compiled for this CPU (bot/models/kernels.py: attention,
#: RMS norm, rotary embedding) and put in place by the model worker between two steps once
#: built; None: PyTorch's ops.
_native: Any = None
#: What the native attention handles: query heads a KV head, head size
#: (csrc/decode_attention.cpp); the native norm, rows (more: a prefill, where PyTorch's
#: threads pay).
NATIVE_MAX_GROUP, NATIVE_MAX_DIM, NATIVE_MAX_ROWS = 8, 256, 64


def use_native(kernels: Any) -> None:
    """Decode steps on the CPU use ``kernels`` from now on (None: PyTorch's ops again)."""
    global _native
    _native = kernels


def _native_for(x: torch.Tensor, *like: torch.Tensor) -> Any:
    """The native kernels, where the row-wise ops (norm, add+norm, SiLU × up) take ``x``
    and the tensors ``like`` it (its shape): contiguous CPU rows, a decode step's few
    (``NATIVE_MAX_ROWS``; more is a prefill, where PyTorch's threads pay), no autograd.
    None: PyTorch's ops."""
    native = _native
    if (
        native is None
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or x.numel() > NATIVE_MAX_ROWS * x.shape[-1]
        or torch.is_grad_enabled()
        or any(t.shape != x.shape or not t.is_contiguous() for t in like)
    ):
        return None
    return native


def _native_failed(what: str) -> None:
    """A native op refused its inputs (a shape it was not built for): never a failed reply —
    PyTorch's ops answer this call and every later one."""
    log.exception("native %s failed; PyTorch's ops serve from now on", what)
    use_native(None)


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of ``q`` ``[B, heads, T, D]`` over the cache ``[B, kv_heads, L, D]``
    (``mask`` None: causal, a whole prompt's own tokens and nothing else).

    Decode steps (one new token per row) on CPU do not go to ``scaled_dot_product_attention``
    as they come: PyTorch's CPU flash kernel tiles the *queries*, and with one query per
    (row, head) it spends its time setting up tiles (attention was 60 % of a 16-row bf16 step).

    - **the native kernel**, once built for this CPU (bf16, fp16, fp32; GQA groups up to 8,
      heads up to 256): per (row, KV head), the group's queries against the cache read in
      place, fp32 sums. Per layer on an AVX512-BF16 EPYC, against the branches below: bf16
      16 rows × 120 cached tokens 235 → 66 µs on 1 thread, 163 → 38 on 2; 16 × 1,000
      1,617 → 508; 1 × 200 30 → 11; fp32 16 × 120 189 → 94. A whole 16-row step with the
      prepacked layers 40.0–40.7 → 30.7–32.2 ms on 1 thread (29.3–30.7 with the native norm
      and rotary too; docs/performance.md).

    Until it is built, or where it cannot be:

    - **bf16**: the query heads that share a KV head (GQA: SmolLM2 has 9 query heads on 3 KV
      heads) become that KV head's query *positions*, ``[B, kv_heads, heads/kv_heads, D]``,
      all seeing the same keys. The kernel then has three queries a tile and a third of the
      tiles, reads the bf16 cache in place and accumulates in fp32. Measured on an
      AVX512-BF16 EPYC, per layer, against the two fp32 matmuls this replaced (which widened
      the cache to fp32 every step): 16 rows × 120 cached tokens 183 → 130 µs on 2 threads,
      308 → 230 µs on 1; 16 × 1,000 1,669 → 852 µs; 1 × 200 47 → 26 µs; the same error
      against fp32 (0.002). From 2 query heads a KV head on it wins (16 × 120, 2 threads:
      2 heads 109 against 490 µs, 8 heads 168 against 288 µs).
    - **fp16** (no native fp16 arithmetic on these CPUs: the kernel is 2.5× slower than
      widening) and **bf16 without GQA** (one query a tile again: 262 against 101 µs): two
      fp32 matmuls, ``keys @ queries.T`` (reads the cache view without a
      copy) → softmax → ``weights.T @ values``.
    - **fp32**, prefills (many queries a row: the kernel's own case; 600 tokens: SDPA 32 ms,
      matmuls 53 ms) and CUDA: SDPA as it comes. fp32 grouped was level (±10 %) on CPU.
    """
    b, heads, t, d = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    native = _native
    if (
        native is not None
        and t == 1
        and mask is not None
        and q.device.type == "cpu"
        and heads % kv_heads == 0
        and heads // kv_heads <= NATIVE_MAX_GROUP
        and d <= NATIVE_MAX_DIM
        and keys.stride(-1) == 1
        and values.stride(-1) == 1
        and mask.dtype == torch.bool
        and mask.stride(-1) == 1
    ):
        try:
            out = native.decode_attention(
                q.reshape(b, kv_heads, heads // kv_heads, d), keys, values, mask.reshape(b, length)
            )
            return out.view(b, heads, 1, d)
        except RuntimeError:
            _native_failed("decode attention")
    if mask is None or t != 1 or q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=kv_heads != heads
        )
    grouped = q.reshape(b, kv_heads, heads // kv_heads, d)  # [B, kv, g, D]
    if q.dtype == torch.bfloat16 and heads > kv_heads:
        # ``mask`` is [B, 1, 1, L]: every query of a row sees the same cached tokens.
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return out.reshape(b, heads, 1, d)
    grouped = grouped.float()
    scores = torch.matmul(keys.float(), grouped.transpose(-1, -2)).mul_(1 / math.sqrt(d))
    scores = scores.masked_fill_(~mask.view(b, 1, length, 1), float("-inf"))  # [B, kv, L, g]
    weights = torch.softmax(scores, -2)
    out = torch.matmul(weights.transpose(-1, -2), values.float())
    return out.view(b, heads, 1, d).to(q.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        q = cfg.num_heads * cfg.head_dim
        kv = cfg.num_kv_heads * cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = _linear(w["qkv.weight"], w.get("qkv.bias"))
        self.qkv.parts = (q, kv, kv)
        self.o = _linear(w["o.weight"])
        self.o.parts = (cfg.hidden_size,)
        self.gate_up = _linear(w["gate_up.weight"])
        self.gate_up.parts = (cfg.intermediate_size, cfg.intermediate_size)
        self.down = _linear(w["down.weight"])
        self.down.parts = (cfg.hidden_size,)
        self.norm1 = RMSNorm(w["norm1.weight"], cfg.rms_norm_eps)
        self.norm2 = RMSNorm(w["norm2.weight"], cfg.rms_norm_eps)
        self.intermediate = cfg.intermediate_size

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: CacheLayer,
        rows: _Rows | None,
        packed: _Packed | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream comes in as ``x + delta`` (``delta`` None: ``x``) and goes out the
        same way, ``(x, delta)``: each sum is made by the norm that reads it
        (:meth:`RMSNorm.add`), as vLLM's layers pass their residual.

        ``x`` is ``[B, T, hidden]``, or ``[N, hidden]`` (the real tokens only) with
        ``packed``: the projections and the MLP then run on those rows alone, and only
        attention sees the padded ``[B, T]`` layout it needs for the cache and the mask."""
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        x, normed = self.norm1.add(x, delta)
        qkv = _with_lora(self.qkv, normed, rows)
        if packed is not None:
            qkv = packed.spread(qkv)
        b, t, _ = qkv.shape
        qkv = qkv.view(b, t, heads + 2 * kv_heads, d).transpose(1, 2)  # [B, heads, T, D]
        # Queries and keys rotate together: one set of element-wise ops instead of two.
        qk = _rotate(qkv[:, : heads + kv_heads], cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        keys, values = cache.append(k, qkv[:, heads + kv_heads :])
        att = attend(q, keys, values, mask)
        att = att.transpose(1, 2).reshape(b, t, heads * d)
        if packed is not None:
            att = packed.gather(att)
        x, normed = self.norm2.add(x, _with_lora(self.o, att, rows))
        gate_up = _with_lora(self.gate_up, normed, rows)
        return x, _with_lora(self.down, _silu_mul(gate_up, self.intermediate), rows)


#: Packed prefills compute a multiple of this many token rows (a few padding rows make up the
#: rest): oneDNN builds a kernel per matmul shape on first use, so a handful of row counts
#: rather than one per prompt mix keeps that cost off the time to first token.
PACK_ALIGN = 16


@dataclass(slots=True)
class _Packed:
    """Where a padded prefill's real tokens are: ``index`` into its ``[B * T]`` positions.

    A batch of prompts is left-padded to its longest, and a prefill that reuses cached
    prefixes is mostly padding (16 chats sharing a system prompt: ~5 new tokens each, padded
    to 32). Every projection costs per row, so running them on the real tokens alone saves
    what the padding would cost; attention, which needs the rectangle, gets it back.
    """

    index: torch.Tensor  # [N] positions in the flattened [B * T] batch
    batch: int
    length: int

    @classmethod
    def of(cls, new: torch.Tensor) -> _Packed | None:
        """For ``new`` (``[B, T]``, 1 where a token is real); None when packing saves little."""
        b, t = new.shape
        real = new.reshape(-1).bool()
        n = int(real.sum())
        aligned = -(-n // PACK_ALIGN) * PACK_ALIGN
        if aligned >= b * t:
            return None
        if aligned > n:  # make up the row count with padding positions (computed, unused)
            real = real.clone()
            real[(~real).nonzero().squeeze(1)[: aligned - n]] = True
        return cls(real.nonzero().squeeze(1), b, t)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, F]`` → ``[N, F]``."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, F]`` → ``[B, T, F]``, zeros where nothing was computed."""
        out = x.new_zeros((self.batch * self.length, x.shape[-1]))
        return out.index_copy_(0, self.index, x).view(self.batch, self.length, -1)

    def rows(self, rows: _Rows | None) -> _Rows | None:
        """Each adapter's batch rows as token rows of the packed layout."""
        if rows is None:
            return None
        owner = self.index // self.length
        return _Rows(
            [
                (name, None if idx is None else torch.isin(owner, idx).nonzero().squeeze(1))
                for name, idx in rows.groups
            ]
        )


class Decoder(nn.Module):
    """Llama-family causal LM: token ids in, next-token logits out, KV cache in place.

    Built from weights already in chinwag's layout (``embed.weight``, ``layers.N.qkv.weight``,
    …); :func:`load` maps a checkpoint onto it.
    """

    inv_freq: torch.Tensor  # a buffer (moves with the model, not saved)

    def __init__(self, cfg: DecoderConfig, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding.from_pretrained(w["embed.weight"], freeze=True)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg,
                {k[len(f"layers.{i}.") :]: v for k, v in w.items() if k.startswith(f"layers.{i}.")},
            )
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(w["norm.weight"], cfg.rms_norm_eps)
        self.lm_head = _linear(w["lm_head.weight"])
        self.register_buffer("inv_freq", _inv_freq(cfg), persistent=False)
        self.adapters: dict[str, dict[str, Any]] = {}  # name → its adapter_config.json

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.config.eos_token_id)

    def new_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> KVCache:
        return KVCache(len(self.layers), layers)

    def adapter_names(self) -> set[str]:
        return set(self.adapters)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        adapters: list[str | None] | None = None,
        last_only: bool | int = False,
    ) -> torch.Tensor:
        """Next-token logits ``[B, T or 1, vocab]`` (``last_only=n``: the last ``n`` positions').

        ``attention_mask`` covers the cached and the new tokens (1 real, 0 padding, left
        padded as the engine keeps its batch); ``position_ids`` are the new tokens' positions;
        ``adapters`` names each row's LoRA adapter (None: the base model).
        """
        x = self.embed(input_ids)
        t, total = input_ids.shape[1], attention_mask.shape[1]
        freqs = position_ids[:, None, :, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, 1, T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        padded = attention_mask[:, None, None, :].bool()  # [B, 1, 1, total]
        allowed: torch.Tensor | None = padded
        if t > 1 and t == total and bool(attention_mask.all()):
            # Whole prompts, nothing cached, no padding: the mask is SDPA's own causal one,
            # which skips the blocks above the diagonal instead of reading a mask for them
            # (a 4,096-token prompt's attention 248 → 129 ms a layer on 2 cores).
            allowed = None
        elif t > 1:
            # New token i sees the cache and the new tokens up to itself. A query that is
            # itself padding would see nothing (softmax over nothing is NaN): let it see its
            # own column — its output is never used.
            causal = torch.ones((t, total), dtype=torch.bool, device=x.device).tril(total - t)
            own = torch.zeros((t, total), dtype=torch.bool, device=x.device)
            own[torch.arange(t), torch.arange(total - t, total)] = True
            allowed = (padded & causal) | own
        rows = _Rows.of(adapters, x.device)
        packed = _Packed.of(attention_mask[:, -t:]) if t > 1 else None
        if packed is not None:
            x, rows = packed.gather(x), packed.rows(rows)
        delta: torch.Tensor | None = None
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            x, delta = layer(x, delta, cos, sin, allowed, kv, rows, packed)
        x = self.norm.add(x, delta)[1]
        if packed is not None:
            x = packed.spread(x)
        if last_only:
            x = x[:, -int(last_only) :]
        return self.lm_head(x)

    # -- adapters ------------------------------------------------------------------------------

    def load_adapter(self, folder: Path | str, name: str) -> None:
        """Read a peft LoRA adapter folder and make it available as ``name``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise Unsupported(f"adapter type {cfg.get('peft_type')!r}")
        for flag in _UNSERVED:
            if cfg.get(flag):
                raise Unsupported(f"LoRA adapters with {flag}")
        if cfg.get("bias", "none") != "none":
            raise Unsupported("LoRA adapters that train biases")
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.exists():
            raise Unsupported("adapter weights not in safetensors")
        raw = load_file(str(weights_file), device=str(self.device))
        r_default = int(cfg.get("r", 8))
        alpha_default = float(cfg.get("lora_alpha", r_default))
        ranks = cfg.get("rank_pattern") or {}
        alphas = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora"))
        found: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
        for key, a in raw.items():
            if ".lora_A." not in key:
                continue
            prefix = key.split(".lora_A.")[0]
            b = raw[key.replace(".lora_A.", ".lora_B.")]
            parts = prefix.split(".")
            target = parts[-1]
            if target not in LORA_TARGETS or "layers" not in parts:
                raise Unsupported(f"LoRA on {prefix}")
            li = int(parts[parts.index("layers") + 1])
            r = int(_pattern(ranks, prefix, r_default))
            alpha = float(_pattern(alphas, prefix, alpha_default))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            found[(li, target)] = (a, b, scale)
        if not found:
            raise Unsupported("no LoRA weights in the adapter")
        dtype = self.dtype
        layer: Any  # a DecoderLayer (ModuleList yields Module to type checkers)
        for li, layer in enumerate(self.layers):
            for module, targets in (
                (layer.qkv, ("q_proj", "k_proj", "v_proj")),
                (layer.o, ("o_proj",)),
                (layer.gate_up, ("gate_proj", "up_proj")),
                (layer.down, ("down_proj",)),
            ):
                pair = _fuse([found.get((li, t)) for t in targets], module.parts, dtype)
                if pair is not None:
                    module.lora[name] = pair
        self.adapters[name] = cfg

    def delete_adapter(self, name: str) -> None:
        for module in self.modules():
            lora = getattr(module, "lora", None)
            if lora:
                lora.pop(name, None)
        self.adapters.pop(name, None)


def _pattern(patterns: dict[str, Any], prefix: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern``: a key matching the module path's tail."""
    for key, value in patterns.items():
        if prefix == key or prefix.endswith("." + key):
            return value
    return default


def _fuse(
    found: list[tuple[torch.Tensor, torch.Tensor, float] | None],
    widths: tuple[int, ...],
    dtype: torch.dtype,
) -> _LoraPair | None:
    """Stack the parts' A matrices and lay their B matrices block-diagonally."""
    if all(f is None for f in found):
        return None
    ranks = [0 if f is None else f[0].shape[0] for f in found]
    a_parts = [f[0] for f in found if f is not None]
    a = torch.cat(a_parts).to(dtype)
    b = a.new_zeros((sum(widths), sum(ranks)))
    row = col = 0
    for f, width, rank in zip(found, widths, ranks, strict=True):
        if f is not None:
            b[row : row + width, col : col + rank] = (f[1] * f[2]).to(dtype)
        row += width
        col += rank
    return _LoraPair(a.contiguous(), b.contiguous())


def _inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3.1's frequency-dependent scaling, as transformers' ``_compute_llama3_parameters``.
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / low, old / high
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def load(folder: Path, *, dtype: torch.dtype, device: str = "cpu") -> Decoder:
    """Build the decoder from a ``save_pretrained`` folder (config.json + safetensors).

    Raises :class:`Unsupported` for a checkpoint it cannot serve exactly.
    """
    from safetensors.torch import load_file

    cfg = DecoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file), device=device))

    def take(name: str) -> torch.Tensor:
        try:
            return weights.pop(name).to(dtype)
        except KeyError:
            raise Unsupported(f"the checkpoint has no {name}") from None

    w: dict[str, torch.Tensor] = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        w[o + "qkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if cfg.attention_bias:
            w[o + "qkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        w[o + "o.weight"] = take(p + "self_attn.o_proj.weight")
        w[o + "gate_up.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
        )
        w[o + "down.weight"] = take(p + "mlp.down_proj.weight")
        w[o + "norm1.weight"] = take(p + "input_layernorm.weight")
        w[o + "norm2.weight"] = take(p + "post_attention_layernorm.weight")
    w["norm.weight"] = take("model.norm.weight")
    if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
        w["lm_head.weight"] = w["embed.weight"]
    else:
        w["lm_head.weight"] = take("lm_head.weight")
    return Decoder(cfg, w).to(device).eval()
