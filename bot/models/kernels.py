"""Native CPU kernels, compiled on the machine that runs them.

PyTorch's kernels are built for every CPU at once and for shapes bigger than a decode step's;
ours (decode attention, RMS norm with the residual add, SiLU × up, rotary embedding —
``csrc/decode_attention.cpp`` — and, on
CPUs with AVX512-BF16, small-batch linear layers — ``csrc/decode_linear.cpp``) are built here,
for this CPU (``-march=native``), the first time a model loads
(~20 s with g++ on 2 cores, on the background thread that prepares the faster layers), and
reused from ``~/.cache/chinwag/kernels`` after that. Its name carries a digest of its source
(and where it lies), PyTorch's version and this CPU's flags, so a cache shared between
machines (a home directory, a Docker layer) never hands one CPU another's instructions.

Nothing depends on it: without a C++ compiler, with ``CHINWAG_NATIVE_KERNELS=0`` or when the
build fails, :func:`build` says why once in the log and PyTorch's kernels serve as before.

    .venv/bin/python -m bot.models.kernels      # build now (``make`` does) and say how it went
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bot.models")

#: The extension's sources: attention, RMS norm and rotary (with the module's bindings), and the
#: small-batch linear layers.
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "decode_attention.cpp", CSRC / "decode_linear.cpp"]
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

#: How ``main`` says it could not build (the bot's build child; its parent reads the reason).
NOT_BUILT = "native kernels: not built — "

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
    # The source's path too: PyTorch's build file names it, and two checkouts sharing one
    # folder would rebuild it in turn (each ~20 s) under each other's running bots.
    parts: list[str | bytes] = [str(source) for source in SOURCES]
    parts += [source.read_bytes() for source in SOURCES]
    parts += [torch.__version__, _cpu_flags()]
    for part in (p if isinstance(p, bytes) else p.encode() for p in parts):
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


def build(cancelled: Callable[[], bool] | None = None) -> Any | None:
    """The compiled module — ``decode_attention(q, k, v, mask)``, ``rms_norm(x, weight,
    eps)``, ``add_rms_norm(x, delta, weight, eps)``, ``silu_mul(gate_up)``, ``rotary(x, cos,
    sin)``, ``linear_supported()``, ``pack_linear(w)``,
    ``linear(x, packed, out_features, bias)`` — built if it is not yet; None (and
    :data:`unavailable` says why) where it cannot be.

    With ``cancelled`` (a running bot), a build that is needed runs in a child process that is
    stopped within a fraction of a second once ``cancelled()`` says so: a bot told to stop
    during its first start's ~20 s of g++ stops on time, not after the compiler.
    """
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
            # Not a fault: a machine without a compiler serves on PyTorch's ops by design.
            _unavailable(name, f"no C++ compiler ({compiler!r} not found)", logging.INFO)
            return None
        started = time.perf_counter()
        if cancelled is not None and not _library(name).exists():
            why = _build_in_child(cancelled)
            if why == "cancelled":
                return None  # not a verdict: the next start builds it
            if why is not None:
                _unavailable(name, why)
                return None
        try:
            module = _load(name)
        except Exception as exc:  # a compiler error, a missing header, no ninja, no room
            _unavailable(name, f"the build failed: {_complaint(exc)}")
            return None
        unavailable = None
        log.info(
            "native kernels ready (%s, %.1f s)",
            directory() / name,
            time.perf_counter() - started,
        )
        _built[name] = module
        _prune(keep=name)
        return module


#: A build no process has loaded for this long goes (each ~1 MB; every upgrade of chinwag or
#: torch, every checkout and every CPU a shared home folder has seen makes one).
KEEP_UNUSED_S = 14 * 24 * 3600.0

_USED = ".chinwag-used"


def _prune(keep: str, now: float | None = None) -> list[str]:
    """Stamp ``keep`` as used now and remove the builds nobody has used for
    :data:`KEEP_UNUSED_S`; returns what went. A build being made or loaded holds its
    ``flock``, and a held one is left alone; a removed build that someone still wanted is
    only rebuilt (~20 s)."""
    now = time.time() if now is None else now
    root = directory()
    with contextlib.suppress(OSError):
        (root / keep / _USED).touch()
    removed = []
    for folder in root.glob("chinwag_decode_attention_*"):
        if folder.name == keep or not folder.is_dir():
            continue
        stamp = folder / _USED
        try:
            used = (stamp if stamp.exists() else folder).stat().st_mtime
        except OSError:
            continue
        if now - used < KEEP_UNUSED_S:
            continue
        try:
            with (folder / ".chinwag-build.lock").open("a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder)
        except OSError:  # held (in use), or not ours to remove
            continue
        removed.append(folder.name)
    if removed:
        log.info("native kernels: removed %d build(s) unused for 14 days", len(removed))
    return removed


def _unavailable(name: str, why: str, level: int = logging.WARNING) -> None:
    """Remember (for this process) that the kernels cannot be had, and say why once."""
    global unavailable
    unavailable = why
    log.log(level, "native kernels unavailable: %s; PyTorch's kernels serve", why)
    _built[name] = None


def _library(name: str) -> Path:
    return directory() / name / f"{name}.so"


def _load(name: str) -> Any:
    """Build (if needed) and import the extension, in this process.

    PyTorch guards a build folder with a lock *file*, which a build killed half-way leaves
    behind, and every later build then waits on it forever. Builds here hold an ``flock`` of
    their own (released by the kernel when a process dies), so a lock file found while
    holding it is such a leftover and goes.
    """
    try:
        import ninja  # the build tool PyTorch drives; from PyPI, on PATH for the build

        if ninja.BIN_DIR not in os.environ.get("PATH", ""):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load

    folder = directory() / name
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".chinwag-build.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        return load(
            name=name,
            sources=[str(source) for source in SOURCES],
            build_directory=str(folder),
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


def _build_in_child(cancelled: Callable[[], bool]) -> str | None:
    """Compile in ``python -m bot.models.kernels --strict``; None once built, else why not."""
    from bot.process import die_with_parent

    child = subprocess.Popen(
        [sys.executable, "-m", "bot.models.kernels", "--strict"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: ninja and g++ stop with it
        preexec_fn=die_with_parent,
    )
    while True:
        try:
            output, _ = child.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if cancelled():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
                log.info("native kernels: build stopped (the bot is stopping)")
                return "cancelled"
    if child.returncode == 0:
        return None
    said = [line for line in (output or "").splitlines() if line.strip()]
    last = said[-1] if said else f"exit {child.returncode}"
    return last.removeprefix(NOT_BUILT)


def main(argv: list[str] | None = None) -> int:
    """Build the kernel now, saying what happened; exit 0 either way (it is an optimisation)
    unless ``--strict`` (a bot's build child: its parent needs to know)."""
    strict = "--strict" in (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    started = time.perf_counter()
    kernel = build()
    if kernel is None:
        print(f"{NOT_BUILT}{unavailable}")
        return 1 if strict else 0
    seconds = time.perf_counter() - started
    print(f"native kernels: ready in {directory()} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
