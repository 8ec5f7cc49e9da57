"""Faster linear layers for serving on CPU: int8 or fp16 weights for small batches, bf16 above.

Generating one token for a handful of conversations reads every weight of the model once and
does little arithmetic with it: the step is bound by memory bandwidth, not compute. Reading
int8 weights (one byte each, one scale per output row) instead of bf16 halves that traffic;
measured on the project's 2-core machine, a decode-shaped matmul runs 2.3–2.8× faster with
``torch.ops.aten._weight_int8pack_mm`` at 1–2 rows and still 1.2–1.7× at 4, but *slower* from
8 rows on, where the bf16 AMX kernels win. Those in turn run 15–40 % faster on a weight
reordered once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``) than through
``F.linear``, which reorders on every call — with bit-identical results.

In the model, though, where each layer's weight comes from memory rather than from a cache a
benchmark keeps warm, oneDNN's kernel ran a 16-row step's layers at ~250 GFLOP/s and ~15 GB/s on
one core of an AVX512-BF16 EPYC: neither the core's bf16 arithmetic (~500) nor its memory
(~38 GB/s). chinwag's own kernel (bot/models/csrc/decode_linear.cpp, compiled for the CPU by
bot/models/kernels.py) reads a layout made for it as one stream and does a step's layers 1.3–1.4×
faster at 1–16 rows, faster than int8 too (which it then replaces: a bf16 weight is the model
as trained, not a rounding of it). Where it is faster is measured at conversion.

So each converted layer keeps its weight and picks per call: the native kernel up to
``native_rows``, int8 for up to ``max_rows`` rows, the prepacked bf16 weight up to
``PACKED_ROWS`` (decode steps of bigger batches), plain ``F.linear`` above (prefill), when
gradients are on (training) or off CPU. The weights come
from a 4-bit GGUF by default, so per-row int8 adds well under 1 % relative error per matmul.
Converted layers stay ``nn.Linear`` (peft wraps them like any other) and the extra copies are
not saved with the model.

A CPU without native bf16 (an AVX2-only EPYC, for one) serves the model in fp32, and there
neither trick applies: its int8 kernel is slow and bf16 is emulated. What does pay there is
fbgemm's fp16 GEMM (``quantized::linear_dynamic_fp16``): weights stored as fp16 halves and
widened in registers (F16C), activations and arithmetic in fp32. Measured on the 211 layers of
SmolLM2-135M, two threads, it read a decode step at 1 row 2.6× faster than fp32 ``F.linear``
and at 16 rows 2.2× (1.5× at 64, 1.3× at 128, 1.06× at 400 rows); an fp16 weight is within
2e-4 relative error of its fp32 original, twenty times closer than bf16. Where it is faster is
measured at conversion (:func:`_fp16_rows`), as for int8.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bot.models.tuning import _ratio

log = logging.getLogger(__name__)


#: Above this many rows (prefill) plain ``F.linear`` is faster than the prepacked weight
#: (measured: 200 rows 2.3 ms against 3.4–5.3 ms).
PACKED_ROWS = 64


class FastLinear(nn.Linear):
    max_rows: int = 4
    w_int8: torch.Tensor | None
    w_scale: torch.Tensor | None
    w_packed: torch.Tensor | None
    #: fbgemm's packed fp16 copy of the weight (and bias), used up to ``fp16_rows`` rows.
    w_fp16: Any = None
    fp16_rows: int = 0

    #: chinwag's own bf16 kernel (bot/models/csrc/decode_linear.cpp) and its copy of the
    #: weight (a buffer, like the other copies: no class default, which would shadow it), used
    #: up to ``native_rows`` rows.
    native: Any = None
    w_native: torch.Tensor | None
    native_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled():
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        native, packed = self.native, self.w_native
        if (
            native is not None
            and packed is not None
            and rows <= self.native_rows
            and x.dtype == torch.bfloat16
            and _native_ok
        ):
            flat = x.reshape(rows, x.shape[-1]).contiguous()
            try:
                out = native.linear(flat, packed, self.out_features, self.bias)
                return out.reshape(*x.shape[:-1], out.shape[-1])
            except RuntimeError:
                _native_failed()
        q, scale = self.w_int8, self.w_scale
        if q is not None and scale is not None and rows <= self.max_rows and x.dtype == scale.dtype:
            flat = x.reshape(rows, x.shape[-1]).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, q, scale)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if self.w_fp16 is not None and rows <= self.fp16_rows and x.dtype == torch.float32:
            flat = x.reshape(rows, x.shape[-1]).contiguous()
            out = torch.ops.quantized.linear_dynamic_fp16(flat, self.w_fp16)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if self.w_packed is not None and rows <= PACKED_ROWS and x.dtype == self.weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.w_packed, self.bias, "none", [], "")
        return super().forward(x)


#: False once the native kernel refused an input: PyTorch's kernels serve from then on.
_native_ok = True


def _native_failed() -> None:
    """Never a failed reply: this call and every later one go to PyTorch's kernels."""
    global _native_ok
    log.exception("native linear kernel failed; PyTorch's kernels serve from now on")
    _native_ok = False


def _can_int8() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _can_prepack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _can_fp16() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


def _pack_fp16(w: torch.Tensor, bias: torch.Tensor | None) -> Any:
    return torch.ops.quantized.linear_prepack_fp16(
        w.detach().float(), None if bias is None else bias.detach().float()
    )


#: Row counts at which the fp16 kernel is timed against fp32 ``F.linear``: decode steps of one
#: and of a full batch (memory-bound), then prefill-sized ones (arithmetic-bound).
FP16_PROBE_ROWS = (1, 16, 64, 256)


#: What the probes found, per kind, layer shapes, dtype and thread count: a property of the
#: CPU, so a process that loads the model again (tests, an operator's reload) does not pay the
#: seconds of probing twice.
_PROBED: dict[tuple[Any, ...], Any] = {}


def _never() -> bool:
    return False


def _fp16_rows(layers: list[nn.Linear], cancelled: Callable[[], bool] = _never) -> int:
    """Up to how many rows fbgemm's fp16 weights beat fp32 ``F.linear`` on this CPU; 0: never.

    Decode shapes are timed on the largest layer (the vocabulary projection: a weight that
    does not fit in cache, as the whole model does not), prefill shapes on a middle-sized one
    (arithmetic-bound, where a large layer would only make the probe slow). Each count must be
    at least 10 % faster, and every smaller one too: a kernel that wins at 256 rows but loses at
    16 is not used at 256 either. About a second on a 2-core CPU.
    """
    by_size = sorted(layers, key=lambda m: m.weight.numel())
    largest, middle = by_size[-1], by_size[len(by_size) // 2]
    key = ("fp16", tuple(largest.weight.shape), tuple(middle.weight.shape), torch.get_num_threads())
    if key in _PROBED:
        return int(_PROBED[key])
    best = 0
    packs: dict[int, Any] = {}
    with torch.inference_mode():
        for rows in FP16_PROBE_ROWS:
            if cancelled():
                return 0
            layer = largest if rows <= 16 else middle
            w = layer.weight.detach().float()
            packed = packs.setdefault(id(layer), _pack_fp16(w, None))
            x = torch.randn(rows, w.shape[1])
            ratio = _ratio(
                functools.partial(torch.ops.quantized.linear_dynamic_fp16, x, packed),
                functools.partial(torch.nn.functional.linear, x, w),
                11 if rows <= 16 else 5,
            )
            if ratio > 0.9:
                break
            best = rows
    log.info("fp16 weights (fbgemm) %s", f"used up to {best} rows" if best else "not used")
    _PROBED[key] = best
    return best


#: Row counts at which the native bf16 kernel is timed against oneDNN's prepacked weight: one
#: conversation's decode step and a full default batch's.
NATIVE_PROBE_ROWS = (1, 16)

#: The most of oneDNN's time the native kernel may take at each probed row count to be used:
#: at a full batch it must win by 5 %; for one conversation it must not lose beyond the noise
#: (with two threads on a 2-core EPYC it is only ~10 % ahead there, which a neighbour can
#: hide), since a level 1-row step still leaves one copy of the weights instead of two
#: (270 MB less for SmolLM2) and 16-row steps 20–35 % faster.
NATIVE_PROBE_NEEDS = {1: 1.05, 16: 0.95}


def _bf16_rival(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The kernel a bf16 layer would use without chinwag's own: the prepacked weight."""
    if _can_prepack():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        except RuntimeError:
            pass
    return lambda x: torch.nn.functional.linear(x, w)


def _native_choice(one: float, full: float) -> int:
    """Up to how many rows the native kernel serves, from its time over oneDNN's at one row
    and at a full batch of 16."""
    if one <= NATIVE_PROBE_NEEDS[1] and full <= NATIVE_PROBE_NEEDS[16]:
        return PACKED_ROWS
    if one <= NATIVE_PROBE_NEEDS[16]:  # a clear win for one conversation only
        return 1
    return 0


def _native_rows(
    layers: list[nn.Linear], native: Any, cancelled: Callable[[], bool] = _never
) -> int:
    """Up to how many rows chinwag's own bf16 kernel serves on this CPU; 0: never (slower,
    or the build has no such kernel: a CPU without AVX512-BF16).

    Timed against the prepacked weight on the largest layer (the vocabulary projection, which
    does not fit in any cache, as the whole model does not) at one row and at a full batch of
    16 (:data:`NATIVE_PROBE_NEEDS`, each ratio from runs side by side: :func:`_ratio`).
    Where it wins at 16 and does not lose at 1 it serves up to
    ``PACKED_ROWS`` and no prepacked copy is made: above 16 rows it is level (32) or a little
    slower (64), rare passes (short prefills), not worth a second copy of every weight
    (270 MB for SmolLM2). On an AVX512-BF16 EPYC, one thread, SmolLM2's 211 layers each once
    as in a step: 1 row 7.5 against 9.6 ms, 16 rows 12.4 against 17.4, 32 rows 25.2 against
    26.8, 64 rows 47.4 against 42.3.
    """
    if native is None or not getattr(native, "linear_supported", lambda: False)() or not layers:
        return 0
    largest = max(layers, key=lambda m: m.weight.numel())
    w = largest.weight.detach()
    key = ("native", tuple(w.shape), torch.get_num_threads())
    if key in _PROBED:
        return int(_PROBED[key])
    with torch.inference_mode():
        try:
            packed = native.pack_linear(w)
        except RuntimeError:
            return 0
        rival = _bf16_rival(w)
        inputs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for rows in NATIVE_PROBE_ROWS]
        best, ratios = 0, [1.0, 1.0]
        for _ in range(2):  # a second look where the first saw no win: a neighbour's burst
            if cancelled():
                return 0
            ratios = [
                _ratio(
                    functools.partial(native.linear, x, packed, w.shape[0]),
                    functools.partial(rival, x),
                    31,
                )
                for x in inputs
            ]
            best = _native_choice(ratios[0], ratios[-1])
            if best == PACKED_ROWS:
                break
    log.info(
        "native linear kernel %s (%.2f× oneDNN's time at 1 row, %.2f× at 16)",
        f"used up to {best} rows" if best else "not used (no faster)",
        ratios[0],
        ratios[-1],
    )
    _PROBED[key] = best
    return best


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8 weights and their scales (in ``w``'s dtype)."""
    wf = w.float()
    s = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(wf / s[:, None]).clamp(-127, 127).to(torch.int8), s.to(w.dtype)


def _int8_pays(
    model: Any, rows: int, cancelled: Callable[[], bool] = _never, native: Any = None
) -> bool:
    """Whether the int8 kernel beats the plain one (or ``native``'s bf16 kernel, where it
    serves these rows) on this CPU, measured on the model's largest layer at ``rows`` rows (a
    decode step's shape; ~50 ms).

    Against chinwag's own bf16 kernel it loses on an AVX512-BF16 EPYC (1 row 9.0 against 7.5
    ms a step's layers, 4 rows 9.4 against 7.6), and a bf16 weight is the model as trained,
    not a rounding of it.

    It does where the CPU has fast int8 dot products (AVX512-VNNI: 2.3–2.8× at 1–2 rows on
    the project's machine) and loses badly where it has not: on an AVX2-only EPYC the int8
    path made decode steps 3× slower (47 → 140 ms) once the layers were converted.
    """
    layers = [m for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n]
    if not layers:
        return False
    layer = max(layers, key=lambda m: m.weight.numel())
    w = layer.weight.detach()
    if w.device.type != "cpu":
        return False
    key = ("int8", tuple(w.shape), w.dtype, rows, torch.get_num_threads(), native is not None)
    if key in _PROBED:
        return bool(_PROBED[key])
    q, scale = _quantize(w)
    slowest = 0.0
    int8_mm = torch.ops.aten._weight_int8pack_mm
    with torch.inference_mode():
        rival: Callable[[torch.Tensor], torch.Tensor] = functools.partial(
            torch.nn.functional.linear, weight=w
        )
        if native is not None:
            rival = functools.partial(
                native.linear, packed=native.pack_linear(w), out_features=w.shape[0]
            )
        for n in sorted({1, rows}):
            if cancelled():
                return False
            x = torch.randn(n, w.shape[1], dtype=w.dtype)
            ratio = _ratio(functools.partial(int8_mm, x, q, scale), functools.partial(rival, x), 11)
            slowest = max(slowest, ratio)
    pays = slowest < 0.9
    _PROBED[key] = pays
    log.info(
        "int8 decode kernel %s: %.2f× the plain kernel's time at up to %d rows",
        "used" if pays else "not used (slower on this CPU)",
        slowest,
        rows,
    )
    return pays


def _cpu_layers(model: Any, dtype: torch.dtype) -> list[nn.Linear]:
    """The model's own linear layers (not LoRA's) on the CPU with weights of ``dtype``."""
    return [
        m
        for n, m in model.named_modules()
        if type(m) is nn.Linear
        and "lora_" not in n
        and m.weight.device.type == "cpu"
        and m.weight.dtype == dtype
    ]


def prepare(
    model: Any,
    *,
    int8: bool = True,
    max_rows: int = 4,
    fp16: bool = True,
    cancelled: Callable[[], bool] = _never,
    native: Any = None,
) -> Callable[[], int]:
    """Measure this CPU's kernels and build the weight copies for every ``nn.Linear`` of
    ``model``; returns the step that installs them (turning each into a :class:`FastLinear`)
    and says how many it converted.

    The preparation takes seconds (about 6 s for SmolLM2 on 2 cores: probes, quantising,
    packing) but only reads the weights, so it runs beside serving on a thread of its own; the
    install is instant and must run where no forward is running — the runtime hands it to its
    model worker, between steps. Until 2026-12-07 both ran on the worker once it had been idle
    for a second, and a bot that was never idle that long (a steady stream of questions, each
    re-ranked) never got its faster layers. LoRA's own small layers (peft's
    ``lora_A``/``lora_B``) stay as they are; the layers peft wraps are converted like any other.
    ``cancelled`` is asked between layers: a model being unloaded stops costing CPU at once.

    ``native``: chinwag's compiled kernels (bot/models/kernels.py). Where its bf16 linear
    kernel is faster (measured, :func:`_native_rows`), bf16 layers get a copy of their weight
    in its layout and use it up to that many rows; the prepacked copy is then kept only if
    it still serves some rows, and the int8 copy only if int8 beats it.
    """
    bf16_layers = _cpu_layers(model, torch.bfloat16)
    native_rows = (
        _native_rows(bf16_layers, native, cancelled) if bf16_layers and native is not None else 0
    )
    use_int8 = int8 and max_rows > 0 and _can_int8()
    if use_int8:
        use_int8 = _int8_pays(
            model, max_rows, cancelled, native if native_rows >= max_rows else None
        )
    fp32_layers = _cpu_layers(model, torch.float32)
    fp16_rows = _fp16_rows(fp32_layers, cancelled) if fp16 and fp32_layers and _can_fp16() else 0
    if cancelled():
        return lambda: 0
    plan = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.weight.device.type != "cpu":
            continue
        if "lora_" in name:
            continue
        if cancelled():
            return lambda: 0
        w = module.weight.detach()
        q = scale = packed = fp16_weight = ours = None
        if use_int8:
            q, scale = _quantize(w)
        if fp16_rows and w.dtype == torch.float32:
            fp16_weight = _pack_fp16(w, module.bias)
        if native_rows and w.dtype == torch.bfloat16 and w.shape[1] % 2 == 0:
            ours = native.pack_linear(w)
        if (
            w.dtype == torch.bfloat16
            and _can_prepack()
            and (ours is None or native_rows < PACKED_ROWS)
        ):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
            except RuntimeError:
                packed = None
        if q is None and packed is None and fp16_weight is None and ours is None:
            continue
        plan.append((module, q, scale, packed, fp16_weight, ours))

    def install() -> int:
        count = 0
        for module, q, scale, packed, fp16_weight, ours in plan:
            if type(module) is not nn.Linear:  # converted meanwhile
                continue
            module.register_buffer("w_int8", q, persistent=False)
            module.register_buffer("w_scale", scale, persistent=False)
            module.register_buffer("w_packed", packed, persistent=False)
            module.register_buffer("w_native", ours, persistent=False)
            module.native = native if ours is not None else None  # type: ignore[assignment]
            module.native_rows = native_rows if ours is not None else 0  # type: ignore[assignment]
            module.max_rows = max_rows  # type: ignore[assignment]
            module.w_fp16 = fp16_weight  # type: ignore[assignment]
            module.fp16_rows = fp16_rows if fp16_weight is not None else 0  # type: ignore[assignment]
            module.__class__ = FastLinear  # last: the layer switches over whole
            count += 1
        log.info(
            "fast CPU linear layers: %d (native bf16 up to %d rows; int8 up to %d rows: %s; "
            "fp16 up to %d rows)",
            count,
            native_rows,
            max_rows,
            use_int8,
            fp16_rows,
        )
        return count

    return install


def convert(
    model: Any, *, int8: bool = True, max_rows: int = 4, fp16: bool = True, native: Any = None
) -> int:
    """:func:`prepare` and install at once; returns how many layers were converted. Not
    thread-safe against forwards."""
    return prepare(model, int8=int8, max_rows=max_rows, fp16=fp16, native=native)()
