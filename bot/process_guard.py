"""Run a command so that it, and every process it starts, ends with the bot.

    python bot/process_guard.py --grace 15 -- COMMAND [ARG...]

The kernel's parent-death signal reaches only a direct child. A server such as vLLM forks
engine and worker processes that outlive their parent when it is killed (measured: SIGKILL of
vLLM's API server left its EngineCore and Worker running, holding memory), and a server that
gets SIGTERM while still starting can hang instead of exiting. This guard sits between the bot
and the command:

- it asks for SIGTERM when the bot dies (by SIGKILL too); the bot starts it in a process
  group of its own, which the command and everything it forks share;
- on SIGTERM (the bot stopping it, or the bot gone) it sends SIGTERM to the whole group, waits
  up to ``--grace`` seconds, then SIGKILLs whatever is left of it;
- when the command exits by itself, the rest of its group is killed (no orphaned engine), and
  the guard exits with the command's status.

Run by file path, not ``-m``: it imports only the standard library and starts in ~20 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

LINUX = sys.platform.startswith("linux")


def _die_with_parent() -> None:
    if LINUX:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def group_members(pgid: int) -> list[int]:
    """Live processes of group ``pgid`` other than this one (from /proc; Linux)."""
    found = []
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # Fields after the command name (in parentheses, which may contain spaces).
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z" and int(entry) != me:
            found.append(int(entry))
    return found


def _signal_others(pgid: int, sig: int, fallback: subprocess.Popen[bytes]) -> None:
    """``sig`` to every other process of the group (to the command alone off Linux)."""
    targets = group_members(pgid) if LINUX else [fallback.pid]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def end_group(child: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM to the rest of the group, then SIGKILL to what is left after ``grace_s``."""
    pgid = os.getpgid(0)
    _signal_others(pgid, signal.SIGTERM, child)
    until = time.monotonic() + grace_s
    while time.monotonic() < until:
        child.poll()  # reap the command, so it stops counting as alive
        if (not group_members(pgid)) if LINUX else child.returncode is not None:
            return
        time.sleep(0.1)
    _signal_others(pgid, signal.SIGKILL, child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grace", type=float, default=15.0)
    parser.add_argument("--parent", type=int, default=0, help="exit at once if it is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    _die_with_parent()
    if args.parent and os.getppid() != args.parent:
        return 1  # the bot died before the guard could ask to follow it
    stopping = False

    def on_term(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    child = subprocess.Popen(command)
    while child.poll() is None and not stopping:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(0.2)
    if stopping:
        end_group(child, args.grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
        return 0
    end_group(child, 5.0)  # it exited by itself: its engine processes go too
    code = child.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
