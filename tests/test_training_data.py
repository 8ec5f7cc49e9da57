"""What the nightly cycle learns from: examples built from the real conversation log."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from bot import Context, Message, Reply, Skill
from bot.core import Bot
from bot.simulation.chat import ChatUser
from tests.conftest import SkillsPlugin, core_settings
from trainers.dataset import build


class Parrot(Skill):
    """Stands in for a generative skill: answers everything, rateable, with provenance."""

    name = "parrot"

    async def score(self, message: Message, ctx: Context) -> float:
        return 1.0

    async def handle(self, message: Message, ctx: Context) -> Reply:
        words = len(message.text.split())
        reply = Reply(f"Happy to help with those {words} words.", rateable=True, model="m")
        if "flag" in message.text:
            reply.metadata["safety"] = {"redacted": ["email"], "flagged": True}
        return reply


@pytest.fixture
async def logged(tmp_path):
    """A log with every kind of reply the dataset builder must tell apart."""
    bot = Bot(core_settings(tmp_path), plugins=[SkillsPlugin(Parrot())])
    await bot.start()
    store = bot.store
    ann = ChatUser(bot, chat_id="c1", user_id="ann")
    bob = ChatUser(bot, chat_id="c2", user_id="bob")
    eve = ChatUser(bot, chat_id="c3", user_id="eve")

    async def say(user: ChatUser, text: str) -> Reply:
        (reply,) = await user.send(text)
        return reply

    liked = await say(ann, "Opening hours? Mail me at ann@example.com")
    await store.add_feedback(liked.id, "test", "ann", 1)
    context_then_liked = await say(ann, "And on Sundays? My card is 4111 1111 1111 1111")
    await store.add_feedback(context_then_liked.id, "test", "ann", 1)
    disliked = await say(bob, "Late fees")
    await store.add_feedback(disliked.id, "test", "bob", 1)
    await store.add_feedback(disliked.id, "test", "carol", -1)  # one 👎 outweighs a 👍
    corrected = await say(bob, "Renewals")
    await store.add_feedback(
        corrected.id, "test", "admin", 0, correction="Twice online.", source="operator"
    )
    flagged = await say(bob, "please flag this")
    await store.add_feedback(flagged.id, "test", "bob", 1)
    await say(bob, "nobody rates this one")
    forgotten = await say(eve, "Secret plans")
    await store.add_feedback(forgotten.id, "test", "eve", 1)
    await store.forget_user("test", "eve")
    await store.flush()
    yield bot
    await bot.stop()


async def cycle(bot: Bot, out, since: datetime | None = None, **options):
    now = datetime.now(UTC)
    since = since or now - timedelta(hours=1)
    conversations = await bot.store.conversations(since)
    return build(
        conversations,
        out,
        forgotten=await bot.store.forgotten_users(),
        since=since,
        until=now + timedelta(seconds=1),
        held_out=0.0,
        adapters=("parrot",),
        **options,
    )


async def test_only_liked_and_corrected_replies_become_examples(logged, tmp_path):
    ds = await cycle(logged, tmp_path / "datasets" / "c1")
    targets = [e.messages[-1]["content"] for e in ds.train]
    assert "Twice online." in targets
    assert len(ds.train) == 3  # two 👍 from ann, one correction
    assert ds.dropped == {"thumbs_down": 1, "safety_flagged": 1, "unrated": 1}
    assert {e.source for e in ds.train} == {"thumbs_up", "correction"}


async def test_examples_carry_the_conversation_before_the_reply(logged, tmp_path):
    ds = await cycle(logged, tmp_path / "datasets" / "c1")
    sunday = next(e for e in ds.train if "sundays" in e.messages[-2]["content"].lower())
    roles = [m["role"] for m in sunday.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert sunday.messages[0]["content"] == "Opening hours? Mail me at [redacted]"


async def test_no_personal_data_or_forgotten_user_reaches_the_disk(logged, tmp_path):
    out = tmp_path / "datasets" / "c1"
    await cycle(logged, out)
    written = (out / "train.jsonl").read_text() + (out / "held_out.jsonl").read_text()
    for leak in ("ann@example.com", "4111 1111 1111 1111", "Secret plans"):
        assert leak not in written
    assert "[redacted]" in written
    assert "eve" not in written and "ann" not in written  # user ids only as hashes


async def test_the_manifest_counts_sources_and_hashes_the_data(logged, tmp_path):
    out = tmp_path / "datasets" / "c1"
    ds = await cycle(logged, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"] == len(ds.train) == 3
    assert manifest["by_source"] == {"thumbs_up": 2, "correction": 1}
    assert manifest["dropped"]["thumbs_down"] == 1
    assert len(manifest["sha256"]) == 64


async def test_a_later_cycle_replays_earlier_data_but_never_a_forgotten_user(logged, tmp_path):
    datasets = tmp_path / "datasets"
    await cycle(logged, datasets / "c1")
    after_first = datetime.now(UTC)
    user = ChatUser(logged, chat_id="c9", user_id="zed")
    (reply,) = await user.send("Parking")
    await logged.store.add_feedback(reply.id, "test", "zed", 1)
    await logged.store.flush()
    again = await cycle(logged, datasets / "c2", after_first, replay_share=1.0)
    assert [e.source for e in again.train] == ["thumbs_up", "replay"]  # 1 new, share 1.0
    await logged.store.forget_user("test", "ann")
    third = await cycle(logged, datasets / "c3", after_first, replay_share=5.0)
    written = (datasets / "c3" / "train.jsonl").read_text()
    assert "Opening hours" not in written and "sundays" not in written.lower()
    assert third.manifest["train"] == len(third.train)


def test_the_split_keeps_each_conversation_on_one_side():
    from trainers.dataset import Example, split

    examples = [
        Example("dialogue", f"conv{i % 20}", [], [{"role": "user", "content": str(i)}], "x")
        for i in range(200)
    ]
    train, test = split(examples, 0.3)
    assert {e.conversation for e in train}.isdisjoint({e.conversation for e in test})
    assert train and test


def test_the_gate_also_scores_earlier_nights_held_out_examples_never_trained_on(tmp_path):
    """One night's held-out split is a handful; the nights before it are test data too."""
    from dataclasses import asdict

    from trainers.dataset import Example, earlier_held_out

    def example(conversation: str, text: str, adapter: str = "qa", user: str = "u") -> Example:
        return Example(adapter, conversation, [user], [{"role": "user", "content": text}], "x")

    def night(name: str, held: list[Example]) -> None:
        (tmp_path / name).mkdir()
        lines = "".join(json.dumps(asdict(e)) + "\n" for e in held)
        (tmp_path / name / "held_out.jsonl").write_text(lines)

    night("c1", [example("a", "first"), example("b", "continued"), example("d", "x", "dialogue")])
    night("c2", [example("c", "second"), example("f", "forgotten", user="gone")])
    night("c3", [example("e", "tonight")])
    tonight_train = [example("b", "the same chat, trained on tonight")]

    found = earlier_held_out(tmp_path, "c3", "qa", tonight_train, {"gone"})
    # Newest night first; tonight's own split, other adapters, a conversation now on the
    # training side and a forgotten user are left out.
    assert [e.messages[0]["content"] for e in found] == ["second", "first"]
