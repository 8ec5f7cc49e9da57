"""The other work a user's machine runs beside the bot, for benchmarks measured under load.

A figure taken on an idle machine is not the one users get: these machines are shared, and
torch's thread pools in particular collapse when one core is taken (two threads can run
several times slower than one). ``busy_core()`` takes one core with a spinning process for as
long as the block runs; ``cpu_limited()`` makes a CPU limit like a container's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path


def _spin(stop: float) -> None:
    while time.monotonic() < stop:
        pass


@contextlib.contextmanager
def busy_core(active: bool = True) -> Iterator[None]:
    """One core kept busy (a pure-Python loop in its own process) while the block runs."""
    if not active:
        yield
        return
    hog = multiprocessing.Process(target=_spin, args=(time.monotonic() + 3600,), daemon=True)
    hog.start()
    try:
        yield
    finally:
        hog.kill()
        hog.join()


@contextlib.contextmanager
def cpu_limited(cores: float) -> Iterator[Path | None]:
    """A control group limited to ``cores`` cores' worth of CPU time, as a container's
    ``--cpus`` or a Kubernetes CPU limit makes one; yields the file a process writes its pid
    into to join it (``cgroup.procs``), or None where this machine lets no group be made
    (not root, no cgroup file system, no cpu controller). Removed once its processes are gone.
    """
    period = 100_000
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")
    control = v2 / "cgroup.subtree_control"
    if control.exists() and "cpu" in control.read_text().split():
        mount, name, limit = v2, "cpu.max", f"{int(cores * period)} {period}"
    elif (v1 / "cpu.cfs_quota_us").exists():
        mount, name, limit = v1, "cpu.cfs_quota_us", str(int(cores * period))
    else:
        yield None
        return
    group = mount / f"chinwag-bench-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        (group / name).write_text(limit)
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        yield None
        return
    try:
        yield group / "cgroup.procs"
    finally:
        for _ in range(100):  # a group can go once the processes in it have
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def join(procs: Path) -> None:
    """This process into the group whose ``cgroup.procs`` that is (``preexec_fn`` of a child)."""
    procs.write_text(str(os.getpid()))
