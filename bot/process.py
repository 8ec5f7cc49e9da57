"""Process hygiene: children that end with the bot, and a shutdown that always ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Threads whose work the process may walk away from at exit (see :func:`leave_abandoned`).
_abandonable: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def glibc() -> Any | None:
    """The C library through ctypes on Linux (``prctl``, ``mallopt``, ``malloc_trim``), or
    None where there is none to ask: every caller's Linux-only tuning becomes a no-op."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def die_with_parent() -> None:
    """In a child before ``exec``: the kernel sends it SIGTERM when the bot dies, even by
    SIGKILL, so no trainer lives on holding the training lock (Linux; elsewhere a no-op)."""
    libc = glibc()
    if libc is None:
        return
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def exit_within(seconds: float) -> None:
    """A stop was asked for: whatever hangs (a stuck adapter, a model call in C), the process
    is gone ``seconds`` from now."""

    def force() -> None:
        log.error("shutdown took longer than %.0fs; exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has really ended (None: nothing to do)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def abandonable_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start ``target`` in a daemon thread the process need not wait for at exit (a model
    still loading when SIGTERM arrives), and remember it for :func:`leave_abandoned`."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    _abandonable.add(thread)
    thread.start()
    return thread


def abandoned() -> list[str]:
    """The names of the abandonable threads still running."""
    return [t.name for t in _abandonable if t.is_alive()]


def leave_abandoned(code: int) -> None:
    """End the process now, with ``code``, if abandoned work is still running; else return.

    Python's normal exit runs C++ static destructors while such a thread may still be inside
    torch or a tokenizer, and a destroyed ``std::thread`` that is still joinable calls
    ``std::terminate``: a clean stop ended in SIGABRT ("terminate called without an active
    exception", exit -6) for 2 of 8 SIGTERMs sent during the model load. ``os._exit`` skips
    the destructors; by now the store is closed and the adapters are stopped, and the log and
    stdio are flushed first, so nothing is lost.
    """
    running = abandoned()
    if not running:
        return
    log.info("exiting with unfinished background work left behind: %s", ", ".join(running))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_for_batch_work() -> dict[str, str]:
    """Settings for a process that runs one long batch job and exits (``chinwag knowledge
    add``), where every CPU-second counts and latency does not; returns what it set.

    - glibc hands blocks over 32 MB straight back to the kernel when freed, so an encoder
      batch's activations (64 texts × 256 tokens × 1,536 wide: 50 MB in bf16) were mapped,
      page-faulted in and unmapped at every batch: 6.4 of 61 CPU-seconds of an ingest of 80
      Python documentation files were system time. Kept in the heap instead (mmap above
      256 MB, trim above 512 MB): 1.3–1.5 s. Not for the bot, which serves long and whose
      decode steps allocate small blocks (no difference measured there).
    - OpenMP's threads spin for a while after each parallel region, burning CPU-seconds the
      job pays for while the main thread tokenises and writes; ``OMP_WAIT_POLICY=PASSIVE``
      lets them sleep (50.4–51.1 user CPU-seconds against 53.6–56.0). Not for the bot
      either: a decode step has hundreds of short regions, each would wake its threads.
      It only takes effect before torch is imported; a value the user set is kept.
    """
    applied: dict[str, str] = {}
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        applied["OMP_WAIT_POLICY"] = "PASSIVE"
    libc = glibc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc: no mallopt
            if libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20) and libc.mallopt(
                _M_TRIM_THRESHOLD, 512 << 20
            ):
                applied["malloc"] = "mmap above 256 MB, trim above 512 MB"
    return applied


def visible_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; every CPU where that cannot be read)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cpu_limit(root: str = "/sys/fs/cgroup", cgroups: str = "/proc/self/cgroup") -> float | None:
    """Cores' worth of CPU time this process's control group may use — a container's
    ``docker run --cpus``, a Kubernetes CPU limit, systemd's ``CPUQuota=`` — or None where
    none is set (or there is no cgroup file system: not Linux).

    The CPUs a process may run on (its affinity, what ``os.cpu_count`` and torch's default
    thread count see) are all of the host's under such a limit: on a 64-core node a bot
    limited to 2 cores would start 64 threads a matmul, each parallel region waiting on
    threads the kernel has throttled until the next 100 ms period. The limit is the lowest
    along the group's path (a parent's limit binds its children), cgroup v2's ``cpu.max``
    or v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; inside a container with its own
    cgroup namespace the group is the root of what it sees.
    """
    try:
        with open(cgroups) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2 (the unified hierarchy; "unified/" when hybrid)
            for mount in (root, os.path.join(root, "unified")):
                if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                    limits += _limits(mount, path, _v2_limit)
                    break
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                mount = os.path.join(root, name)
                if os.path.isdir(mount):
                    limits += _limits(mount, path, _v1_limit)
                    break
    return min(limits) if limits else None


def _limits(mount: str, path: str, read: Callable[[str], float | None]) -> list[float]:
    """The limits along ``path`` from its group up to ``mount``; where the path is not there
    (a container without its own cgroup namespace sees its group as the mount), the mount's."""
    here = os.path.join(mount, path.strip("/"))
    if not os.path.isdir(here):
        here = mount
    found = []
    while True:
        limit = read(here)
        if limit is not None:
            found.append(limit)
        try:
            if len(here) <= len(mount) or os.path.samefile(here, mount):
                return found
        except OSError:  # a group removed meanwhile: what was read stands
            return found
        here = os.path.dirname(here)


def _v2_limit(group: str) -> float | None:
    try:
        with open(os.path.join(group, "cpu.max")) as f:
            quota, period = [*f.read().split(), "100000"][:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(group: str) -> float | None:
    try:
        with open(os.path.join(group, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(group, "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None


def fit_threads_to_cpu_limit() -> int | None:
    """Under a CPU limit below the CPUs in view, start every thread pool at the limit's
    whole cores (at least one): torch's in this process (the tuners measure from there) and,
    through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, OpenMP's, FAISS's and every child's (the
    trainer, a vLLM server). A value the operator set is kept. Returns the thread count set,
    or None where there is no limit to fit."""
    visible = len(visible_cpus())
    limit = cpu_limit()
    if limit is None or int(limit) >= visible or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, int(limit))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
    global fitted
    fitted = f"CPU limit {limit:.2g} cores (cgroup) of {visible} in view: {threads} threads"
    log.info("%s", fitted)
    return threads


#: What :func:`fit_threads_to_cpu_limit` did, for the log once it is set up (it runs first).
fitted: str | None = None
