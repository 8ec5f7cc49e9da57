"""CPU settings chosen by measurement: dtype at load, torch threads while serving and training.

On the project's 2-core machines a bf16 matmul (AMX/AVX512-BF16) is several times faster than
fp32, and two torch threads collapse to a fraction of one thread's speed as soon as anything
else runs beside the bot. Neither is a safe constant across users' machines, so both are
measured: the dtype once at load with a matmul of the model's own shape, the thread count
continuously — while serving from the decode steps themselves (``ThreadTuner``), while training
from a short matmul timed at each count (``fastest_threads``, see trainers/threads.py) —
because the neighbours change during the day.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.process import cpu_limit, visible_cpus

log = logging.getLogger(__name__)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cpus() -> int:
    """The CPUs this process may run on, as whole cores of its cgroup CPU limit where that is
    fewer (a container's ``--cpus``: :func:`bot.process.cpu_limit`)."""
    cpus = len(visible_cpus())
    limit = cpu_limit()
    return cpus if limit is None else max(1, min(cpus, int(limit)))


def _time(fn: Callable[[], Any], repeats: int, pick: Callable[[list[float]], float] = min) -> float:
    """``fn``'s time after one warm-up run: the best of ``repeats`` runs, or ``pick`` of them."""
    fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return pick(runs)


def _ratio(fn: Callable[[], Any], rival: Callable[[], Any], pairs: int = 15) -> float:
    """``fn``'s time over ``rival``'s: the median of ``pairs`` ratios, each of two runs side
    by side (in alternating order, so that neither always runs on the warmer cache).

    Timing one kernel's runs and then the other's lets a neighbour that wakes between the
    two decide the comparison: a fresh-clone CI run beside other work once found chinwag's
    own linear kernel "no faster" than oneDNN's (it is 20–35 % faster) and served without
    it. Each ratio here is taken within a millisecond or two; a burst slows both of its runs
    or spoils one pair out of fifteen, and the median leaves that pair out.
    """
    fn()
    rival()
    ratios = []
    for i in range(pairs):
        first, second = (fn, rival) if i % 2 == 0 else (rival, fn)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        ours, theirs = (t1 - t0, t2 - t1) if i % 2 == 0 else (t2 - t1, t1 - t0)
        ratios.append(ours / max(theirs, 1e-9))
    ratios.sort()
    return ratios[len(ratios) // 2]


def thread_candidates() -> list[int]:
    """One thread, all cores but one (left to the event loop, the embedder and the
    classifier) and all cores: the counts worth measuring."""
    n = usable_cpus()
    return sorted({1, max(1, n - 1), n})


def has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and always slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def fastest_threads(candidates: list[int], work: Callable[[], Any], repeats: int = 15) -> int:
    """The thread count that runs ``work`` fastest now, by the median of ``repeats`` runs.

    The median, not the best run: a thread that lost its core to a neighbour stalls only some
    runs, and the best of them hides it (2 threads beside a busy core: best 8.9 ms, median
    18–24 ms, against 9.5–10 ms on one thread).
    """
    import statistics

    import torch

    before = torch.get_num_threads()
    timings = {}
    try:
        for n in candidates:
            torch.set_num_threads(n)
            timings[n] = _time(work, repeats, statistics.median)
    finally:
        torch.set_num_threads(before)
    return min(timings, key=lambda n: timings[n])


def choose_cpu_dtype(hidden: int = 576, intermediate: int = 1536) -> Any:
    """bfloat16 when this CPU runs a decode-shaped bf16 matmul clearly faster than fp32.

    Only CPUs that advertise native bf16 (AVX512-BF16 or AMX) are tried: elsewhere bf16 is
    emulated and always slower. The probe takes a few milliseconds.
    """
    import torch

    if not has_native_bf16():
        return torch.float32
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(intermediate, hidden, dtype=dtype)
        x = torch.randn(16, hidden, dtype=dtype)
        timings[dtype] = _time(functools.partial(torch.nn.functional.linear, x, w), 20)
    ratio = timings[torch.float32] / timings[torch.bfloat16]
    chosen = torch.bfloat16 if ratio >= 1.2 else torch.float32
    log.info("dtype: %s (bf16 matmul %.1fx fp32 on this CPU)", str(chosen)[6:], ratio)
    return chosen


class Neighbours:
    """How many of this process's CPUs other work keeps busy, read from the kernel's counters.

    The thread tuner otherwise learns of a neighbour only from its own steps getting slower —
    a jump of 2× three steps running, or the next scheduled look — and beside a busy core its
    two-thread steps were 2.1× slower, on the edge of that test: the first 16-chat round after
    a neighbour arrived ran 1.4 s on two threads (525 against 600–615 tok/s for the rounds
    after). ``/proc/stat`` says it directly: each CPU's busy time (user, system, irq, softirq
    and steal — a hypervisor running another guest is a neighbour too), less this process's
    own (``/proc/self/stat``, all its threads), over a window of ``every`` seconds. Niced work
    (the nightly trainer, a batch job) is left out while this process is not niced itself:
    it yields its core to ours, so it takes none. Returns None where there is no /proc (not
    Linux): the step timings alone decide there.
    """

    def __init__(
        self,
        every: float = 0.5,
        cpus: set[int] | None = None,
        *,
        stat: str = "/proc/stat",
        own: str = "/proc/self/stat",
    ) -> None:
        self.every = every
        self._paths = (stat, own)
        self.cpus = cpus if cpus is not None else visible_cpus()
        self._last: tuple[float, float, float] | None = None  # (time, busy ticks, own ticks)
        self._hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self.busy: float | None = None  # cores' worth, over the last whole window
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        try:
            self._niced = os.getpriority(os.PRIO_PROCESS, 0) > 0
        except (AttributeError, OSError):
            self._niced = False

    def _read(self) -> tuple[float, float] | None:
        try:
            busy = 0.0
            with open(self._paths[0]) as f:
                for line in f:
                    if not line.startswith("cpu") or line[3] == " ":
                        continue
                    name, *fields = line.split()
                    if int(name[3:]) in self.cpus:
                        ticks = [float(x) for x in fields]
                        # user, system, irq, softirq, steal (+ nice where it competes)
                        busy += ticks[0] + ticks[2] + sum(ticks[5:8])
                        busy += ticks[1] if self._niced else 0.0
            with open(self._paths[1]) as f:
                own = f.read().rsplit(")", 1)[1].split()
            return busy, float(own[11]) + float(own[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return None

    def follow(self) -> None:
        """Keep the figure fresh from a thread of its own (a read of two small files every
        ``every`` seconds), so the first step after a pause already knows what runs beside
        it: sampled only from the steps, the first half second of every burst after an idle
        spell ran on a thread count chosen blind (a 16-chat round's first prefill on two
        threads beside a busy core). Idempotent; :meth:`close` ends it."""
        with self._lock:
            if self._follower is not None:
                return
            self._stop.clear()
            self._follower = threading.Thread(
                target=self._follow, name="chinwag-neighbours", daemon=True
            )
            self._follower.start()

    def _follow(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def close(self) -> None:
        with self._lock:
            follower, self._follower = self._follower, None
        self._stop.set()
        if follower is not None:
            follower.join(timeout=2)

    def sample(self, now: float | None = None) -> float | None:
        """Cores' worth kept busy by others over the last window (a new window starts once
        ``every`` seconds have passed; between, the last figure stands)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._sample(now)

    def _sample(self, now: float) -> float | None:
        if self._last is not None and now - self._last[0] < self.every:
            return self.busy
        read = self._read()
        if read is None:
            return None
        if self._last is not None:
            seconds = now - self._last[0]
            others = (read[0] - self._last[1]) - (read[1] - self._last[2])
            # A window much longer than asked for spans a pause in which nobody asked (the
            # bot idle): what ran then says nothing about now, so a fresh window starts.
            stale = seconds > 3 * self.every + 0.5
            self.busy = None if stale else max(0.0, others / self._hz / seconds)
        self._last = (now, *read)
        return self.busy


def size_class(batch: int) -> int:
    """1, 2–3, 4–7, 8–15, 16–31 … rows: the steps the tuner compares with one another."""
    return max(1, batch).bit_length()


@dataclass(slots=True)
class _Streak:
    """Steps of one size class in a row far slower or far faster than usual."""

    slow: int = 0
    fast: int = 0
    fast_ref: float = float("inf")  # the usual time when the fast run began


class ThreadTuner:
    """Picks the torch intra-op thread count that gives the fastest decode steps *now*.

    The worker reports each step's duration; every ``explore_every`` steps it runs
    ``probe_steps`` steps on another candidate and keeps whichever was faster (by more than
    ``margin``), so a neighbour that starts hogging a core moves the bot to fewer threads
    within seconds (at once when steps suddenly take twice as long), and back when it leaves
    (at once too when steps suddenly take under two thirds of their usual time: the core it
    gave up may be free again).
    The default candidates are ``thread_candidates()``.

    Steps are compared only with steps of their own size class (:func:`size_class`): a
    16-row step costs 2.5× a one-row step, and the two counts do not scale alike. Until
    2026-12-07 one average per count mixed them (with a 2 % allowance a row), and beside a
    busy core the tuner moved a one-row conversation to two threads (19.1 against the 21.6
    ms "usual" that the 16-row round before had left; two threads then took 34 ms a step
    where one took 14) — and a batch shrinking as its chats finished looked like a neighbour
    leaving.

    With ``neighbours`` (:class:`Neighbours`, the kernel's account of what else runs on these
    CPUs), a neighbour that keeps a core busy (half a core or more counts) caps the thread
    count at once — no waiting for slow steps or a scheduled look — and probes do not try
    more threads than are left; when it leaves, more threads are tried at the next step.

    The engine keeps two: decode steps (a few rows, bound by memory bandwidth, often fastest
    on one thread of two) and prefill or scoring passes (hundreds of rows, bound by
    arithmetic). Run on the decode tuner's single thread, a QA question's five scoring passes
    took 0.8 s each instead of 0.5 s on 2 idle cores — the count that suits one does not
    suit the other. ``start`` is the count to begin from, ``first_look`` the step at which
    the first other count is tried.
    """

    def __init__(
        self,
        candidates: list[int] | None = None,
        *,
        explore_every: int = 128,
        probe_steps: int = 4,
        margin: float = 0.1,
        first_look: int = 16,
        start: int | None = None,
        neighbours: Neighbours | None = None,
    ) -> None:
        if candidates is None:
            candidates = thread_candidates()
        self.candidates = candidates
        self.current = candidates[-1] if len(candidates) == 1 else candidates[0]
        if start in candidates:
            self.current = start
        self.explore_every = explore_every
        self.first_look = first_look
        self.probe_steps = probe_steps
        self.margin = margin
        self._ema: dict[tuple[int, int], float] = {}  # (threads, size class) → seconds a step
        self._steps = 0
        self._probing: int | None = None
        self._probe_times: list[tuple[int, float]] = []  # (size class, seconds)
        # Per size class: steps in a row far slower than usual (a neighbour came: look again
        # now) and far faster (one left: look again). Kept per class because the engine's
        # cohorts take turns: with a 2-row and a 16-row cohort running, one streak for all
        # steps was cut at every step and never reached three.
        self._streaks: dict[int, _Streak] = {}
        self._look = False  # a look is due (scheduled, or :meth:`look_now`)
        self.neighbours = neighbours
        self._cap = max(candidates)  # threads the neighbours leave room for

    def _room(self) -> None:
        """Follow the neighbours: fewer threads at once when they take cores, a look at more
        when they give them back."""
        assert self.neighbours is not None
        busy = self.neighbours.sample()
        if busy is None:
            return
        cores = len(self.neighbours.cpus)
        cap = max(1, cores - int(busy + 0.5))
        fits = [c for c in self.candidates if c <= cap] or [min(self.candidates)]
        if cap < self._cap and self.current > max(fits):
            log.info(
                "model threads: %d → %d (other work keeps %.1f of %d cores busy)",
                self.current,
                max(fits),
                busy,
                cores,
            )
            self.current = max(fits)
            self._probing = None
        elif cap > self._cap and any(c > self.current for c in fits):
            self.look_now()  # a core came back: see whether more threads pay again
        self._cap = cap

    def threads_for_next_step(self, probe: bool = True) -> int:
        """The count for the next step. ``probe=False``: this step must not be a probe (it is
        long, and another count may be twice as slow); a look that falls due waits for a
        step that may be."""
        if len(self.candidates) < 2:
            return self.current
        if self.neighbours is not None:
            self._room()
        # The first look comes early (``first_look``), then every ``explore_every`` steps.
        every = self._steps and self._steps % self.explore_every == 0
        if (self._steps == self.first_look or every) and self._probing is None:
            self._look = True
        if not probe:
            return self.current
        streak = any(st.slow >= 3 or st.fast >= 3 for st in self._streaks.values())
        if self._probing is None and (streak or self._look):
            self._streaks.clear()
            self._look = False
            others = [c for c in self.candidates if c != self.current and c <= self._cap]
            if others:
                self._probing = others[(self._steps // self.explore_every) % len(others)]
                self._probe_times = []
        return self._probing if self._probing is not None else self.current

    def look_now(self) -> None:
        """Try another count at the next step (another tuner saw the machine change)."""
        if self._probing is None:
            self._look = True

    def record(self, threads: int, seconds: float, batch: int) -> None:
        # Within a size class rows still vary (8 to 15): allow a little for each.
        cost = seconds / (1.0 + 0.02 * (batch - 1))
        size = size_class(batch)
        self._steps += 1
        if self._probing is not None and threads == self._probing:
            self._probe_times.append((size, cost))
            if len(self._probe_times) >= self.probe_steps:
                self._judge_probe()
            return
        old = self._ema.get((threads, size))
        st = self._streaks.setdefault(size, _Streak())
        # A neighbour that just started (or a core the OS took away) shows as a run of steps
        # twice as slow as usual: do not wait for the next scheduled look.
        st.slow = st.slow + 1 if old is not None and cost > 2 * old else 0
        # Against the usual time from before the streak (the average follows the new speed).
        if old is not None and st.fast == 0:
            st.fast_ref = old
        st.fast = st.fast + 1 if old is not None and cost < 0.66 * st.fast_ref else 0
        self._ema[(threads, size)] = cost if old is None else 0.8 * old + 0.2 * cost

    def _judge_probe(self) -> None:
        """Compare the probe with the current count on the size class the probe saw most."""
        assert self._probing is not None
        sizes = [size for size, _ in self._probe_times]
        counts = Counter(sizes)
        size = max(reversed(sizes), key=counts.__getitem__)  # a tie goes to the latest
        times = sorted(t for c, t in self._probe_times if c == size)
        probe = times[len(times) // 2]
        mine = self._ema.get((self.current, size))
        self._ema[(self._probing, size)] = probe
        if mine is not None and probe < mine * (1 - self.margin):
            log.info(
                "model threads: %d → %d (%.1f ms vs %.1f ms a step of %d+ rows)",
                self.current,
                self._probing,
                probe * 1000,
                mine * 1000,
                1 << (size - 1),
            )
            self.current = self._probing
        self._probing = None
