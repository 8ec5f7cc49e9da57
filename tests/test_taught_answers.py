"""An operator's correction is the answer the next user gets (knowledge/taught.py).

Through the real core, QA skill, knowledge index and embedder, on a private copy of the FAQ
index (teaching writes to the index; the session's shared one must stay as ingested).
"""

from __future__ import annotations

import json
import shutil

import pytest

from knowledge import taught


@pytest.fixture
def private_kb(faq_kb, tmp_path):
    folder = tmp_path / "kb"
    shutil.copytree(faq_kb.directory, folder, ignore=shutil.ignore_patterns(".write.lock"))
    return folder


@pytest.fixture
def qa_config() -> dict:
    return {}


@pytest.fixture
def chinwag_config(private_kb, sentiment_registry, qa_config) -> dict:
    return {
        "knowledge": {"directory": str(private_kb)},
        "models": {"registry_dir": str(sentiment_registry), "device": "cpu"},
        "skills": {"qa": qa_config},
    }


CORRECTION = (
    "A bygglov is the building permit the municipality grants; apply for it online through "
    "the Mina sidor e-service."
)


async def test_the_next_user_who_asks_gets_the_operators_correction_cited_as_taught(
    chinwag_chat, private_kb
):
    operator = chinwag_chat(admin=True)
    (first,) = await operator.send("What is a bygglov?")
    assert first.skill == "qa" and "Mina sidor" not in first.text
    confirmation = await operator.ask(f"/correct {CORRECTION}")
    assert "from now on I answer “What is a bygglov?” with your correction" in confirmation

    (later,) = await chinwag_chat(user_id="someone-else", chat_id="elsewhere").send(
        "what's a bygglov?"
    )
    assert later.skill == "qa"
    assert later.metadata["mode"] == "taught"
    assert later.metadata["answer"] == CORRECTION  # as the operator wrote it
    assert "taught by an operator" in later.sources[0].title
    (entry,) = taught.entries(private_kb / taught.FOLDER)
    assert (entry.question, entry.answer) == ("What is a bygglov?", CORRECTION)
    assert entry.author == entry.asked_by == f"{operator.platform}:{operator.user_id}"


# The neighbour scores about 0.80 against the taught question, on the default's edge: the
# threshold is lowered so that only the rival passage can keep the taught answer out.
@pytest.mark.parametrize("qa_config", [{"taught_min_score": 0.7, "top_k": 10}])
async def test_a_taught_answer_does_not_answer_a_neighbouring_question_the_faq_answers_better(
    chinwag_chat,
):
    """Found by bench/learning.py: taught for "how do I apply", the correction (0.80) took the
    place of the FAQ's own "who is eligible" answer (0.87) for "who can claim"."""
    operator = chinwag_chat(admin=True)
    await operator.send("How do I apply for the ROT deduction?")
    await operator.ask("/correct You don't apply: the contractor deducts it on the invoice.")

    (other,) = await chinwag_chat(user_id="someone-else", chat_id="elsewhere").send(
        "Who can claim the ROT tax deduction?"
    )
    assert other.skill == "qa" and other.metadata["mode"] != "taught"
    assert other.sources[0].title.startswith("Who is eligible for the ROT deduction?")
    (again,) = await chinwag_chat(user_id="a-third", chat_id="third").send(
        "how do i apply for the ROT deduction?"
    )
    assert again.metadata["mode"] == "taught"


# One passage only: the correction and the FAQ entry it corrects carry the same question
# vector, so asked word for word they tie, and only one of the two can be passed on.
@pytest.mark.parametrize("qa_config", [{"top_k": 1}])
async def test_asked_word_for_word_the_faq_question_gets_the_correction_not_the_faq_answer(
    chinwag_chat,
):
    question = "How long does an extension take?"
    operator = chinwag_chat(admin=True)
    await operator.send(question)
    await operator.ask("/correct Allow about ten weeks from a complete application.")

    (later,) = await chinwag_chat(user_id="someone-else", chat_id="elsewhere").send(question)
    assert later.metadata["mode"] == "taught"
    assert later.metadata["answer"] == "Allow about ten weeks from a complete application."


async def test_correcting_the_same_question_again_replaces_the_taught_answer(
    chinwag_chat, private_kb
):
    operator = chinwag_chat(admin=True)
    await operator.send("What is a bygglov?")
    await operator.ask(f"/correct {CORRECTION}")
    await operator.send("what is a bygglov")
    await operator.ask("/correct A bygglov is a building permit; ask the planning office.")
    (entry,) = taught.entries(private_kb / taught.FOLDER)
    assert entry.answer == "A bygglov is a building permit; ask the planning office."
    (reply,) = await chinwag_chat(user_id="u2", chat_id="c2").send("What is a bygglov?")
    assert "planning office" in reply.metadata["answer"]
    assert "Mina sidor" not in reply.text


async def test_a_corrected_small_talk_reply_trains_but_teaches_no_fact(chinwag_chat, private_kb):
    operator = chinwag_chat(admin=True)
    (hello,) = await operator.send("hello there, nice day")
    assert hello.skill == "dialogue"
    reply = await operator.ask("/correct Hello! How can I help you with your building project?")
    assert "next training cycle uses it" in reply
    assert taught.entries(private_kb / taught.FOLDER) == []


async def test_an_answer_too_long_to_teach_is_still_kept_for_training(chinwag_chat, chinwag_bot):
    operator = chinwag_chat(admin=True)
    (answer,) = await operator.send("What is a bygglov?")
    reply = await operator.ask("/correct " + "word " * 600)
    assert "stored your correction" in reply
    assert "did not add it to the knowledge base: the answer is longer than" in reply
    await chinwag_bot.store.flush()
    (row,) = await chinwag_bot.store.feedback_for(answer.id)
    assert row.source == "operator" and row.correction.startswith("word word")


async def test_forget_removes_the_answers_taught_from_that_users_questions(
    chinwag_chat, private_kb
):
    operator = chinwag_chat(admin=True)
    await operator.send("What is a bygglov?")
    await operator.ask(f"/correct {CORRECTION}")
    assert "removed 1 answer an operator had taught from your questions" in await operator.ask(
        "/forget"
    )
    assert taught.entries(private_kb / taught.FOLDER) == []
    (reply,) = await chinwag_chat(user_id="u3", chat_id="c3").send("What is a bygglov?")
    assert "Mina sidor" not in reply.text
    assert all("taught" not in s.title for s in reply.sources)


async def test_operators_can_turn_teaching_off(chinwag_bot, chinwag_chat, private_kb):
    chinwag_bot.services["knowledge"].teaching = False  # knowledge.teach_corrections = false
    operator = chinwag_chat(admin=True)
    await operator.send("What is a bygglov?")
    assert "next training cycle uses it" in await operator.ask(f"/correct {CORRECTION}")
    assert taught.entries(private_kb / taught.FOLDER) == []


def test_an_entry_is_keyed_by_its_question_and_written_whole(tmp_path):
    first = taught.write(tmp_path, "How do I reset it?", "Hold the button.", author="op")
    again = taught.write(tmp_path, "  how do i   reset it ", "Hold it 5 s.", author="op")
    assert first.path == again.path
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary files
    assert json.loads(first.path.read_text())["a"] == "Hold it 5 s."
    with pytest.raises(taught.TeachError, match="must have text"):
        taught.write(tmp_path, "   ", "x", author="op")
    (first.path.parent / "broken.json").write_text("{not json")
    assert [e.answer for e in taught.entries(tmp_path)] == ["Hold it 5 s."]


async def test_rated_answers_teach_the_qa_adapter_the_prompt_it_serves(
    chinwag_chat, chinwag_bot, tmp_path
):
    """A liked answer and an operator's correction become examples of *answering from the
    passages*: the prompt the model saw, then the answer without its source list. A
    correction the passages do not support is taught to the knowledge base, not to the
    adapter: trained on it, the model would learn to answer from memory."""
    from datetime import UTC, datetime, timedelta

    from trainers.dataset import build

    operator = chinwag_chat(admin=True)
    (liked,) = await operator.send("How long does it take to get a building permit?")
    assert "👍" in await operator.ask("/good")
    (cost,) = await operator.send("What does a building permit cost?")
    assert cost.skill == "qa"
    fee = "The fee follows the municipal tariff: 25,000-50,000 SEK for a single-family home."
    assert "from now on" in await operator.ask(f"/correct {fee}")
    # The search misses here (the passage it finds is about sanction fees): the correction
    # goes beyond what the model was shown.
    (bygglov,) = await operator.send("What is a bygglov?")
    assert "bygglov" not in bygglov.metadata["prompt"][1]["content"].split("Question:")[0]
    assert "from now on" in await operator.ask(
        "/correct A bygglov is the municipality's permission to build."
    )
    await chinwag_bot.store.flush()
    since = datetime.now(UTC) - timedelta(hours=1)
    dataset = build(
        await chinwag_bot.store.conversations(since),
        tmp_path / "cycle",
        forgotten=set(),
        since=since,
        until=datetime.now(UTC) + timedelta(seconds=1),
        held_out=0.0,
        adapters=("qa",),
    )
    by_target = {e.messages[-1]["content"]: e for e in dataset.train}
    assert set(by_target) == {liked.text.split("\n\nSources:")[0], fee}
    assert dataset.dropped["qa_beyond_passages"] == 1
    for example in by_target.values():
        system, asked, _ = example.messages
        assert system["role"] == "system" and "reference passages" in system["content"]
        assert asked["content"].startswith("Reference passages:\n[1] ")
        assert "Sources:" not in example.messages[-1]["content"]
    assert "Question: What does a building permit cost?" in by_target[fee].messages[1]["content"]


async def test_a_broken_index_keeps_the_correction_and_the_entry_for_after_the_repair(
    chinwag_chat, chinwag_bot, private_kb
):
    operator = chinwag_chat(admin=True)
    (answer,) = await operator.send("What is a bygglov?")
    for index_file in private_kb.glob("index-*"):
        index_file.write_bytes(b"\0garbage")
    service = chinwag_bot.services["knowledge"]
    reply = await operator.ask(f"/correct {CORRECTION}")
    assert "stored your correction" in reply and "Adding it to the knowledge base failed" in reply
    await chinwag_bot.store.flush()
    (row,) = await chinwag_bot.store.feedback_for(answer.id)
    assert row.correction == CORRECTION  # kept for training
    (entry,) = taught.entries(private_kb / taught.FOLDER)  # and on disk for the index

    service.kb.rebuild()  # what `chinwag knowledge rebuild` does
    service.kb.add([entry.path.parent], sync=True)  # `chinwag knowledge add <dir>/taught`
    (later,) = await chinwag_chat(user_id="u4", chat_id="c4").send("What is a bygglov?")
    assert "Mina sidor" in later.text
