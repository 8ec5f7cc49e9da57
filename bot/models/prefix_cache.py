"""Keys and values of finished replies, kept so a chat's next turn prefills only what is new.

A chat's next prompt repeats everything before it: the system prompt, the earlier turns, the
bot's own last reply. Recomputing all of it is most of the prefill work from the second turn
on (and the time to first token users wait for). So when a reply finishes, the engine keeps
that row's KV (prompt plus generated tokens) here; a new prompt that starts with the same tokens
reuses the longest matching part and only its suffix is prefilled. Every prompt shares at least
the system prompt, so first turns gain too.

Entries are per adapter version (a LoRA changes the keys and values), bounded by a total token
budget and evicted least recently used. Keys and values stay on the model's device in its
dtype: ~23 KB a token for the 135M default, so the default 4,096 tokens is under 100 MB.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True, eq=False)
class Prefix:
    """One row's cache: ``layers[i] = (keys [H, n, D], values [H, n, D])`` for ``tokens``."""

    adapter: str | None
    tokens: np.ndarray
    layers: list[tuple[Any, Any]]

    def __len__(self) -> int:
        return len(self.tokens)


class PrefixCache:
    def __init__(self, max_tokens: int = 4096, *, min_match: int = 16) -> None:
        self.max_tokens = max_tokens
        #: Shorter matches are not worth a gather and a wider attention: prefill them.
        self.min_match = min_match
        self._entries: OrderedDict[int, Prefix] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return self._tokens

    def match(self, adapter: str | None, prompt: list[int]) -> tuple[Prefix, int] | None:
        """The entry sharing the longest start with ``prompt``, and how many tokens it shares.

        At most ``len(prompt) - 1``: the last prompt token must be fed to get the next one.
        """
        if not self._entries or len(prompt) <= self.min_match:
            return None
        want = np.asarray(prompt, dtype=np.int64)
        best: tuple[Prefix, int] | None = None
        best_key = 0
        for key, entry in self._entries.items():
            if entry.adapter != adapter:
                continue
            n = min(len(entry), len(want) - 1)
            same = entry.tokens[:n] == want[:n]
            shared = n if same.all() else int(np.argmin(same))
            if shared >= self.min_match and (best is None or shared > best[1]):
                best = (entry, shared)
                best_key = key
        if best is not None:
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.reused_tokens += best[1]
        return best

    def put(self, adapter: str | None, tokens: list[int], layers: list[tuple[Any, Any]]) -> None:
        if len(tokens) > self.max_tokens or len(tokens) <= self.min_match:
            return
        new = np.asarray(tokens, dtype=np.int64)
        # An entry this one extends (the same conversation's previous turn) is covered by it.
        for key, entry in list(self._entries.items()):
            if (
                entry.adapter == adapter
                and len(entry) <= len(new)
                and np.array_equal(entry.tokens, new[: len(entry)])
            ):
                self._remove(key)
        self._entries[id(layers)] = Prefix(adapter, new, layers)
        self._tokens += len(new)
        while self._tokens > self.max_tokens:
            self._remove(next(iter(self._entries)))

    def drop_adapter(self, adapter: str) -> None:
        """Forget what was computed with an adapter version that is being unloaded."""
        for key, entry in list(self._entries.items()):
            if entry.adapter == adapter:
                self._remove(key)

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._tokens -= len(entry)
