"""Training data from the conversation log: what the generative adapters learn each cycle.

For every reply a generative skill (``dialogue``, ``qa``) sent, the feedback decides:

- an operator's correction (``/correct``) → an example with the corrected reply;
- a 👎 from anyone → dropped, and it wins over 👍 (one unhappy user is a reason to doubt it);
- a reply the safety filter flagged (redacted or withheld) → dropped;
- a 👍 → an example with the reply as sent;
- no rating → not used: silence is not approval;
- a ``qa`` target the passages in its prompt do not support (content-word overlap below
  ``qa_min_support``, the serving check's own measure) → dropped: trained on it, the adapter
  would learn to answer beyond its passages — from memory — which the QA skill exists to
  prevent. Such a correction is still learned, as a taught answer in the knowledge base
  (knowledge/taught.py), where the next asker's search finds it.

Each example is the conversation before the reply (up to ``context_turns`` earlier turns, in
order) followed by the reply, as chat messages the base model's template formats. A skill
that prompts the model with more than the conversation records the chat messages it sent as
``metadata["prompt"]`` and its answer without decoration (QA's source list) as
``metadata["answer"]``: the example is then that prompt followed by the target, so the adapter
learns the task it is served for — QA answers from the passages it was shown, not from
memory of the bare question. Before
anything is written, every text is redacted (emails, phone and card numbers, secrets, URLs with
credentials — :mod:`bot.privacy`), users who asked to be forgotten are left out (and taken out
of earlier cycles' data reused for replay), and duplicates are removed. The split is by
conversation, so no held-out example shares a chat with a training one; a replay share of
earlier cycles' training data is mixed in against forgetting. A manifest records counts,
sources, the reasons examples were dropped and a hash of the data.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bot.files import atomic_write
from bot.privacy import redact
from bot.store.rows import Conversation, StoredMessage
from bot.text import support

GENERATIVE = ("dialogue", "qa")


@dataclass
class Example:
    adapter: str
    conversation: str  # sha256 of platform:chat — the split key, not the chat id itself
    users: list[str]  # sha256 of platform:user_id — so a later /forget can remove it
    messages: list[dict[str, str]]
    source: str  # "thumbs_up" | "correction" | "replay"
    #: The user's message as they wrote it (redacted): what the gate asks the bot again with
    #: the candidate in service. Empty in data written before it was kept.
    asked: str = ""
    #: The adapter version that wrote the reply ("" for the base model or none): the gate
    #: does not score the version in service against its own words.
    written_by: str = ""

    def key(self) -> str:
        return _hash(self.adapter, json.dumps(self.messages, sort_keys=True))


@dataclass
class Dataset:
    train: list[Example] = field(default_factory=list)
    held_out: list[Example] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    manifest: dict[str, Any] = field(default_factory=dict)

    def for_adapter(self, name: str) -> tuple[list[Example], list[Example]]:
        return (
            [e for e in self.train if e.adapter == name],
            [e for e in self.held_out if e.adapter == name],
        )


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def user_hash(platform: str, user_id: str) -> str:
    return _hash(platform, user_id)


def _clean(text: str) -> str:
    return redact(text, pii=True, secrets=True)[0].strip()


def _verdict(reply: StoredMessage, feedback: list[Any]) -> tuple[str | None, str]:
    """(target text or None, source or drop reason) for one logged reply."""
    corrections = [f for f in feedback if f.correction and f.source == "operator"]
    if corrections:
        return corrections[-1].correction, "correction"
    if any(f.rating < 0 for f in feedback):
        return None, "thumbs_down"
    safety = (reply.meta or {}).get("safety") or {}
    if safety.get("flagged") or safety.get("blocked"):
        return None, "safety_flagged"
    if any(f.rating > 0 for f in feedback):
        answer = (reply.meta or {}).get("answer")
        return (answer if isinstance(answer, str) and answer.strip() else reply.text), "thumbs_up"
    return None, "unrated"


def _recorded_prompt(reply: StoredMessage) -> list[dict[str, str]] | None:
    """The chat messages the skill sent the model for this reply, when it recorded them."""
    prompt = (reply.meta or {}).get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return None
    if not all(
        isinstance(m, dict)
        and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str)
        for m in prompt
    ):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _passages_in(prompt: list[dict[str, str]]) -> str:
    """The reference passages of a QA prompt (its user turn without the question)."""
    asked = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return asked.rsplit("\n\nQuestion:", 1)[0]


def examples_from(
    conversations: Iterable[Conversation],
    *,
    forgotten: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
    adapters: tuple[str, ...] = GENERATIVE,
    context_turns: int = 4,
    qa_min_support: float = 0.75,
) -> tuple[list[Example], Counter[str]]:
    """Examples (not yet split or de-duplicated) and the reasons replies were not used."""
    out: list[Example] = []
    dropped: Counter[str] = Counter()
    for conv in conversations:
        by_id = {m.id: m for m in conv.messages}
        history: list[StoredMessage] = []
        skipped: set[int] = set()
        for m in conv.messages:
            if (m.direction == "in" and (conv.platform, m.user_id or "") in forgotten) or (
                m.direction == "out" and m.reply_to_id in skipped
            ):
                skipped.add(m.id)  # someone who asked to be forgotten, and the replies to them
                continue
            history.append(m)
            if m.direction != "out" or m.skill not in adapters:
                continue
            target, why = _verdict(m, conv.feedback.get(m.id, []))
            if target is None:
                dropped[why] += 1
                continue
            asked = by_id.get(m.reply_to_id) if m.reply_to_id else None
            if asked is None:
                dropped["no_question"] += 1
                continue
            recorded = _recorded_prompt(m)
            if (
                recorded is not None
                and m.skill == "qa"
                and support(target, [_passages_in(recorded)]) < qa_min_support
            ):
                dropped["qa_beyond_passages"] += 1
                continue
            if recorded is not None:
                before = []
                messages = [{**r, "content": _clean(r["content"])} for r in recorded]
            else:
                before = [h for h in history[:-1] if h.id < asked.id][-2 * context_turns :]
                messages = [
                    {
                        "role": "user" if h.direction == "in" else "assistant",
                        "content": _clean(h.text),
                    }
                    for h in before
                    if h.text.strip()
                ]
                messages.append({"role": "user", "content": _clean(asked.text)})
            messages.append({"role": "assistant", "content": _clean(target)})
            users = sorted(
                {user_hash(conv.platform, h.user_id) for h in [*before, asked] if h.user_id}
            )
            out.append(
                Example(
                    m.skill or "",
                    _hash(conv.platform, conv.chat_id),
                    users,
                    messages,
                    why,
                    _clean(asked.text),
                    m.adapter_version or "",
                )
            )
    return out, dropped


LABELS = ("negative", "neutral", "positive")


def labelled_messages(
    conversations: Iterable[Conversation],
    *,
    forgotten: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
) -> list[Example]:
    """Users' messages an operator labelled (``/label``), for the sentiment classifier.

    The latest label wins; the example's one message carries the text (redacted) and the
    label as ``{"role": "label", "content": …}``.
    """
    out = []
    for conv in conversations:
        for m in conv.messages:
            if m.direction != "in" or (conv.platform, m.user_id or "") in forgotten:
                continue
            labels = [f.correction for f in conv.feedback.get(m.id, []) if f.source == "label"]
            if not labels or labels[-1] not in LABELS:
                continue
            out.append(
                Example(
                    "sentiment",
                    _hash(conv.platform, conv.chat_id),
                    [user_hash(conv.platform, m.user_id)] if m.user_id else [],
                    [
                        {"role": "user", "content": _clean(m.text)},
                        {"role": "label", "content": labels[-1]},
                    ],
                    "label",
                )
            )
    return out


def split(
    examples: list[Example], held_out: float, seed: int = 13
) -> tuple[list[Example], list[Example]]:
    """By conversation: all of a chat's examples land on the same side."""
    train: list[Example] = []
    test: list[Example] = []
    for e in examples:
        bucket = int(_hash(str(seed), e.conversation)[:8], 16) / 16**8
        (test if bucket < held_out else train).append(e)
    return train, test


def dedupe(examples: Iterable[Example]) -> list[Example]:
    seen: set[str] = set()
    out = []
    for e in examples:
        if (k := e.key()) not in seen:
            seen.add(k)
            out.append(e)
    return out


def read_examples(path: Path) -> list[Example]:
    if not path.exists():
        return []
    return [
        Example(**json.loads(line))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def replay_examples(
    datasets_dir: Path,
    current: str,
    n: int,
    forgotten_hashes: set[str],
    seed: int,
) -> list[Example]:
    """Up to ``n`` training examples from earlier cycles, minus anyone forgotten since."""
    pool: list[Example] = []
    for d in sorted(p for p in datasets_dir.glob("*") if p.is_dir() and p.name != current):
        pool.extend(
            e for e in read_examples(d / "train.jsonl") if not set(e.users) & forgotten_hashes
        )
    pool = [e for e in pool if e.source != "replay"]  # replay the originals only
    random.Random(seed).shuffle(pool)
    return [Example(**{**asdict(e), "source": "replay"}) for e in pool[:n]]


def earlier_held_out(
    datasets_dir: Path,
    current: str,
    adapter: str,
    train: Sequence[Example],
    forgotten_hashes: set[str],
) -> list[Example]:
    """``adapter``'s held-out examples of earlier cycles, newest cycle first.

    Never trained on (replay draws from ``train.jsonl`` only), they are test data still, and
    one night's split is too small to show an improvement: 4 to 8 examples in the learning
    bench, where even "better on every one" of 4 is not significant. A conversation that
    has since reached the training side is left out, as is anyone forgotten since.
    """
    trained = {e.conversation for e in train}
    found: list[Example] = []
    for d in sorted((p for p in datasets_dir.glob("*") if p.is_dir()), reverse=True):
        if d.name == current:
            continue
        found.extend(
            e
            for e in read_examples(d / "held_out.jsonl")
            if e.adapter == adapter
            and e.source != "replay"
            and e.conversation not in trained
            and not set(e.users) & forgotten_hashes
        )
    return dedupe(found)


def operator_labels(
    datasets_dir: Path, forgotten_hashes: set[str]
) -> tuple[list[Example], list[Example]]:
    """Every operator label of every cycle so far, as (train, held-out).

    The classifier is tuned on all of them each time, not on the last night's alone: labels
    are few and costly, and a tuning pass that saw only the newest would forget the rest.
    A message labelled again later keeps its latest label; the split is by conversation, so a
    message stays on the side it was first put on. Anyone forgotten since is left out.
    """
    latest: dict[tuple[str, str], tuple[Example, bool]] = {}
    for d in sorted(p for p in datasets_dir.glob("*") if p.is_dir()):
        for name, held in (("train.jsonl", False), ("held_out.jsonl", True)):
            for e in read_examples(d / name):
                if e.adapter != "sentiment" or e.source == "replay":
                    continue
                key = (e.conversation, e.messages[0]["content"])
                latest[key] = (e, held)
    kept = [(e, held) for e, held in latest.values() if not set(e.users) & forgotten_hashes]
    return [e for e, held in kept if not held], [e for e, held in kept if held]


def carried_examples(
    datasets_dir: Path, pending: dict[str, list[str]], forgotten_hashes: set[str]
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of earlier cycles that an adapter skipped for too few.

    A small bot collects feedback slowly: a night with 13 useful ratings is below
    ``min_examples``, and throwing them away would mean it never trains. They stay pending,
    on the side of the split they were on, until the adapter has enough to train on — minus
    anyone who has asked to be forgotten since.
    """
    train: list[Example] = []
    held: list[Example] = []
    for adapter, cycles in pending.items():
        for cycle in cycles:
            for name, side in (("train.jsonl", train), ("held_out.jsonl", held)):
                side.extend(
                    e
                    for e in read_examples(datasets_dir / cycle / name)
                    if e.adapter == adapter
                    and e.source != "replay"
                    and not set(e.users) & forgotten_hashes
                )
    return train, held


def build(
    conversations: list[Conversation],
    out_dir: Path,
    *,
    forgotten: dict[tuple[str, str], datetime] | set[tuple[str, str]],
    since: datetime | None,
    until: datetime,
    held_out: float = 0.1,
    replay_share: float = 0.2,
    context_turns: int = 4,
    adapters: tuple[str, ...] = GENERATIVE,
    seed: int = 13,
    pending: dict[str, list[str]] | None = None,
    qa_min_support: float = 0.75,
) -> Dataset:
    """Build, redact, split and write one cycle's dataset under ``out_dir`` (atomically).

    ``pending``: adapter → earlier cycles whose examples it skipped (too few); they are
    carried into this one (:func:`carried_examples`)."""
    gone = set(forgotten)
    found, dropped = examples_from(
        conversations,
        forgotten=gone,
        adapters=adapters,
        context_turns=context_turns,
        qa_min_support=qa_min_support,
    )
    if "sentiment" in adapters:
        found += labelled_messages(conversations, forgotten=gone)
    unique = dedupe(found)
    if len(found) > len(unique):
        dropped["duplicate"] += len(found) - len(unique)
    train, test = split(unique, held_out, seed)
    gone_hashes = {user_hash(p, u) for p, u in gone}
    carried_train, carried_held = carried_examples(out_dir.parent, pending or {}, gone_hashes)
    train, test = dedupe(carried_train + train), dedupe(carried_held + test)
    replay = replay_examples(
        out_dir.parent,
        out_dir.name,
        int(len(train) * replay_share),
        gone_hashes,
        seed,
    )  # a replayed copy of a carried example is a duplicate, and dropped below
    train = dedupe(train + replay)
    ds = Dataset(train, test, dropped)
    lines = {
        "train.jsonl": "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in train),
        "held_out.jsonl": "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in test),
    }
    ds.manifest = {
        "cycle": out_dir.name,
        "since": since.isoformat() if since else None,
        "until": until.isoformat(),
        "conversations": len(conversations),
        "train": len(train),
        "held_out": len(test),
        "by_adapter": dict(Counter(e.adapter for e in train + test)),
        "by_source": dict(Counter(e.source for e in train + test)),
        "carried": len(carried_train) + len(carried_held),
        "dropped": dict(dropped),
        "replay_share": replay_share,
        "redaction": "bot.privacy.redact (pii + secrets)",
        "sha256": hashlib.sha256("".join(lines.values()).encode()).hexdigest(),
    }
    for name, text in lines.items():
        atomic_write(out_dir / name, text)
    atomic_write(out_dir / "manifest.json", json.dumps(ds.manifest, indent=2))
    return ds
