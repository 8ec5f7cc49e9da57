"""Message ids that the application assigns, snowflake style.

64-bit ids made of milliseconds since 2026-01-01 (41 bits), a per-process node number
(10 bits) and a sequence (12 bits). Assigning ids before the row is written lets the bot log its
replies without waiting for the database — the reply already knows the id its 👍/👎 buttons will
point to — and keeps ids unique across several bot processes writing to one PostgreSQL
database. Ids sort by time, so "the last N turns" is an index scan on the primary key.
"""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import datetime

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NODE_BITS = 10
SEQ_BITS = 12
MAX_SEQ = (1 << SEQ_BITS) - 1


class IdGenerator:
    def __init__(self, node: int | None = None) -> None:
        if node is None:
            node = (os.getpid() ^ random.getrandbits(NODE_BITS)) & ((1 << NODE_BITS) - 1)
        self.node = node
        self._last = -1
        self._seq = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            now = int(time.time() * 1000) - EPOCH_MS
            if now <= self._last:
                # Same millisecond, or the clock stepped back: stay monotonic.
                now = self._last
                self._seq += 1
                if self._seq > MAX_SEQ:
                    now += 1
                    self._seq = 0
            else:
                self._seq = 0
            self._last = now
            return (now << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | self._seq

    @staticmethod
    def timestamp_ms(message_id: int) -> int:
        return (message_id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS

    @staticmethod
    def lower_bound(when: datetime) -> int:
        """The smallest id that can have been assigned at or after ``when``."""
        ms = max(0, int(when.timestamp() * 1000) - EPOCH_MS)
        return ms << (NODE_BITS + SEQ_BITS)
