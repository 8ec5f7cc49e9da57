"""Native CPU kernels, compiled on the machine that runs them.

PyTorch's kernels are built for every CPU at once and for shapes bigger than a decode step's;
one of ours is built here, for this CPU (``-march=native``), the first time a model loads
(~20 s with g++ on 2 cores, on the background thread that prepares the faster layers), and
reused from ``~/.cache/chinwag/kernels`` after that. Its name carries a digest of its source,
PyTorch's version and this CPU's flags, so a cache shared between machines (a home directory,
a Docker layer) never hands one CPU another's instructions.

Nothing depends on it: without a C++ compiler, with ``CHINWAG_NATIVE_KERNELS=0`` or when the
build fails, :func:`build` says why once in the log and PyTorch's kernels serve as before.

    .venv/bin/python -m bot.models.kernels      # build now (``make`` does) and say how it went
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bot.models")

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

_lock = threading.Lock()
_built: dict[str, Any] = {}
#: Why the kernel is not in use, once a build was tried (also said in the log).
unavailable: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def directory() -> Path:
    """Where built kernels are kept (``CHINWAG_KERNELS_DIR`` overrides)."""
    configured = os.environ.get("CHINWAG_KERNELS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "chinwag" / "kernels"


def _name() -> str:
    import torch

    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(" ".join(FLAGS).encode())
    return f"chinwag_decode_attention_{digest.hexdigest()[:16]}"


def _complaint(exc: BaseException) -> str:
    """The compiler's own first error line, not ninja's "build stopped: subcommand failed"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line and "ninja" not in line]
    return ((errors or lines or [type(exc).__name__])[0])[:300]


def enabled() -> bool:
    return os.environ.get("CHINWAG_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def build() -> Callable[..., Any] | None:
    """The compiled ``decode_attention(q, k, v, mask)``, built if it is not yet; None (and
    :data:`unavailable` says why) where it cannot be."""
    global unavailable
    if not enabled():
        unavailable = "turned off (CHINWAG_NATIVE_KERNELS=0)"
        return None
    with _lock:
        name = _name()
        if name in _built:
            return _built[name]
        compiler = os.environ.get("CXX") or "c++"
        if shutil.which(compiler) is None:
            unavailable = f"no C++ compiler ({compiler!r} not found)"
            log.info(
                "native decode attention unavailable: %s; PyTorch's kernel serves", unavailable
            )
            _built[name] = None
            return None
        try:
            import ninja  # the build tool PyTorch drives; from PyPI, on PATH for the build

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        from torch.utils.cpp_extension import load

        folder = directory() / name
        started = time.perf_counter()
        try:
            folder.mkdir(parents=True, exist_ok=True)  # an unwritable home is a reason too
            module = load(
                name=name,
                sources=[str(SOURCE)],
                build_directory=str(folder),
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # a compiler error, a missing header, no ninja
            unavailable = f"the build failed: {_complaint(exc)}"
            log.warning(
                "native decode attention unavailable: %s; PyTorch's kernel serves", unavailable
            )
            _built[name] = None
            return None
        unavailable = None
        log.info(
            "native decode attention ready (%s, %.1f s)", folder, time.perf_counter() - started
        )
        _built[name] = module.decode_attention
        return module.decode_attention


def main() -> int:
    """Build the kernel now; exit 0 either way (it is an optimisation), saying what happened."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    kernel = build()
    if kernel is None:
        print(f"native decode attention: not built — {unavailable}")
    else:
        seconds = time.perf_counter() - started
        print(f"native decode attention: ready in {directory()} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
