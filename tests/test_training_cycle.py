"""The nightly cycle end to end on the embedded SmolLM2: real LoRA training on a simulated log,
a gate on real losses, the registry, hot swap in a running bot, and what a crash leaves behind.

Configurations are tiny (a few optimiser steps, short sequences) so the whole file runs in a
couple of minutes on two CPU cores; the machinery is the one a full cycle uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot import Context, Message, Reply, Skill
from bot.core import Bot
from bot.models.registry import AdapterRegistry
from bot.simulation.chat import ChatUser
from bot.testing import chinwag_test_settings
from tests.conftest import SkillsPlugin
from trainers.cli_train import adapter_line
from trainers.cycle import CycleBusy, CycleConfig, cycle_lock, run_cycle

TINY = {
    "adapters": ["companion"],
    "held_out": 0.2,
    "regression_size": 8,
    "gate_answers": 4,  # the answer check on a few prompts: generation is the slow part
    "gate_in_service": False,  # the in-service check has its own specification below
    "lora": {
        "max_steps": 4,
        "batch_size": 4,
        "gradient_accumulation": 1,
        "max_length": 96,
        "min_examples": 10,
        "rank": 8,
    },
}


class Companion(Skill):
    """A generative skill's stand-in whose replies are the other human's real lines."""

    name = "companion"

    def __init__(self, poisoned: bool = False) -> None:
        self.script: dict[str, str] = {}
        self.poisoned = poisoned

    async def score(self, message: Message, ctx: Context) -> float:
        return 1.0

    async def handle(self, message: Message, ctx: Context) -> Reply:
        text = "lol" if self.poisoned else self.script.get(message.text, "ok")
        # Written by a version other than the one in service (the base model), as a
        # reply of yesterday's adapter is.
        return Reply(text, rateable=True, model="m", adapter_version="yesterday")


def settings_for(root: Path, cache: Path, **trainers):
    return chinwag_test_settings(
        root, {"bot": {"fallback": "fallback"}, "trainers": {**TINY, **trainers}}, cache
    )


async def simulate_log(
    settings, *, poisoned: bool = False, chats: int = 30, skip: int = 0, skill: str = "companion"
) -> None:
    """Users from chitchat-dataset talk to the bot; a scripted rule rates the replies."""
    from bot.simulation.users import chitchat_conversations

    companion = Companion(poisoned)
    companion.name = skill
    talks = ([text for _, text in conv] for conv in chitchat_conversations())
    conversations = [blocks for blocks in talks if len(blocks) >= 4][skip : skip + chats]
    # Standing in for a built-in skill, it takes that skill's place while the log is made.
    disabled = [*settings.disabled_plugins, skill] if skill != "companion" else []
    logging = settings
    if disabled:
        others = {k: v for k, v in settings.skills.items() if k != skill}
        logging = settings.model_copy(update={"disabled_plugins": disabled, "skills": others})
    async with Bot(logging, plugins=[SkillsPlugin(companion)]) as bot:
        for i, blocks in enumerate(conversations):
            user = ChatUser(bot, chat_id=f"chat{i}", user_id=f"user{i}")
            for j, (said, answer) in enumerate(zip(blocks[0:4:2], blocks[1:5:2], strict=False)):
                companion.script[said] = answer
                if j == 0 and i % 10 == 3:
                    said = f"{said} mail me at user{i}@example.com"
                    companion.script[said] = answer
                (reply,) = await user.send(said)
                rating = -1 if i % 10 == 7 else 1  # every tenth chat is unhappy
                await bot.store.add_feedback(reply.id, "test", f"user{i}", rating)
        await bot.store.flush()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """One real cycle on a healthy simulated log, shared by the specifications below."""
    root = tmp_path_factory.mktemp("cycle")
    cache = tmp_path_factory.getbasetemp().parent / "chinwag-model-cache"
    settings = settings_for(root, cache)
    asyncio.run(simulate_log(settings))
    report = run_cycle(settings, settings.section("trainers", CycleConfig))
    return settings, report


def test_the_dataset_keeps_rated_replies_and_leaves_out_thumbs_down_and_pii(healthy):
    settings, report = healthy
    manifest = report["dataset"]
    assert manifest["dropped"]["thumbs_down"] == 6  # 3 unhappy chats × 2 turns
    written = "".join(
        p.read_text() for p in (Path(settings.data_dir) / "datasets").rglob("*.jsonl")
    )
    assert "@example.com" not in written and "[redacted]" in written
    assert manifest["train"] + manifest["held_out"] == 60 - 6


def test_the_candidate_is_a_peft_adapter_that_loads(healthy):
    from peft import PeftConfig

    settings, report = healthy
    result = report["adapters"]["companion"]
    registry = AdapterRegistry.for_data_dir(settings.data_dir)
    entry = registry.get("companion", result["version"])
    assert (entry.path / "adapter_model.safetensors").exists()
    assert PeftConfig.from_pretrained(str(entry.path)).r == 8
    assert entry.meta["dataset_sha256"] == report["dataset"]["sha256"]
    assert (entry.path / "report" / "report.html").read_text().count("data:image/png") >= 2


def test_the_cycle_report_shows_the_nights_so_far_with_the_figure_the_gate_read(healthy):
    from trainers.history import nights

    settings, report = healthy
    reports = Path(settings.data_dir) / "trainers" / "reports"
    (night,) = nights(reports)["companion"]
    result = report["adapters"]["companion"]
    assert night.decision == result["decision"] and night.version == result["version"]
    assert night.figure == "answer F1, held-out prompts"
    assert night.candidate == result["candidate"]["answers"]["f1"]
    page = (reports / report["cycle"] / "report.html").read_text()
    assert "Night by night" in page and "companion night by night" in page


def test_the_gate_compares_real_losses_and_answers_and_decides_by_them(healthy):
    _settings, report = healthy
    r = report["adapters"]["companion"]
    for side in ("baseline", "candidate"):
        for split in ("held_out", "regression"):
            assert 0 < r[side][split]["loss"] < 20 and r[side][split]["tokens"] > 0
            assert len(r[side][split]["per_example"]) == (
                r["held_out"] if split == "held_out" else r["regression"]
            )
        # What users would see: both versions answered the held-out prompts.
        assert 0 <= r[side]["answers"]["f1"] <= 1
    assert r["baseline"]["held_out"]["loss"] != r["candidate"]["held_out"]["loss"]
    assert set(r["gate"]) == {"held_out loss", "regression loss", "answer F1"}
    worse = any(c["worse"] for c in r["gate"].values())
    better = r["gate"]["held_out loss"]["better"] or r["gate"]["answer F1"]["better"]
    assert r["decision"] == ("promoted" if better and not worse else "rejected")
    assert r["train_tokens_per_s"] > 0 and r["curve"]


def test_the_gate_holds_back_a_consistent_regression_not_noise_or_one_outlier():
    from trainers.gate import compare

    base = [0.31, 0.29, 0.35, 0.30, 0.33, 0.29]
    noise = [b + d for b, d in zip(base, [0.02, -0.015, 0.01, 0.005, -0.01, 0.008], strict=True)]
    assert not compare("loss", base, noise, higher_is_better=False).worse  # 1 % on six
    assert compare("loss", base * 2, [b * 1.2 for b in base * 2], higher_is_better=False).worse
    # Worse on seven of eight; one big improvement does not buy the rest back.
    lol = [3.6, 3.9, 2.6, 3.2, 5.1, 10.0, 12.5, 3.4]
    after = [3.9, 4.1, 3.1, 3.8, 5.4, 10.1, 8.2, 3.6]
    assert compare("regression loss", lol, after, higher_is_better=False).worse
    assert compare("F1", [0.6] * 6, [0.2] * 6, higher_is_better=True).worse
    assert not compare("F1", [0.6, 0.5], [0.7, 0.6], higher_is_better=True).worse
    within = compare(
        "loss", base * 2, [b * 1.04 for b in base * 2], higher_is_better=False, margin=0.05
    )
    assert not within.worse


def test_promotion_needs_a_significant_gain_not_just_no_loss():
    from trainers.gate import compare

    base = [0.31, 0.29, 0.35, 0.30, 0.33, 0.29, 0.30, 0.32]
    assert compare("loss", base, [b * 0.9 for b in base], higher_is_better=False).better
    assert not compare("loss", base, base, higher_is_better=False).better  # all ties
    # Better on four of four is what a fair coin does one time in sixteen: not yet shown.
    assert not compare("loss", base[:4], [b * 0.9 for b in base[:4]], higher_is_better=False).better
    mixed = [b * (0.9 if i % 4 else 1.1) for i, b in enumerate(base)]  # better on 6 of 8
    assert not compare("loss", base, mixed, higher_is_better=False).better


def test_a_candidate_no_better_than_the_one_in_service_stays_out(tmp_path, chinwag_model_cache):
    """Trained at a learning rate too small to change a weight, the candidate is the base
    model again: nothing shows it worse, and nothing shows it better."""
    settings = settings_for(
        tmp_path, chinwag_model_cache, lora={**TINY["lora"], "learning_rate": 1e-12}
    )
    asyncio.run(simulate_log(settings))
    r = run_cycle(settings, settings.section("trainers", CycleConfig))["adapters"]["companion"]
    assert not any(c["worse"] for c in r["gate"].values()), r["gate"]
    assert r["decision"] == "rejected"
    assert r["why"].startswith("not measurably better than the base model: held_out loss")
    assert AdapterRegistry.for_data_dir(settings.data_dir).current("companion") is None
    assert adapter_line("companion", r).startswith("companion: rejected")


def test_a_candidate_trained_on_poisoned_replies_is_rejected(tmp_path, chinwag_model_cache):
    settings = settings_for(
        tmp_path,
        chinwag_model_cache,
        lora={**TINY["lora"], "learning_rate": 2e-3, "max_steps": 6},
        regression_size=16,  # enough conversations for the sign test to see it clearly
    )
    asyncio.run(simulate_log(settings, poisoned=True, chats=20))
    report = run_cycle(settings, settings.section("trainers", CycleConfig))
    r = report["adapters"]["companion"]
    assert r["decision"] == "rejected", r
    assert "regression loss" in r["why"]
    assert AdapterRegistry.for_data_dir(settings.data_dir).current("companion") is None


GREETING_SCENARIOS = """\
name: a greeting is answered in words, not with lol
turns:
  - say: Hi there! How are you today?
    expect:
      skill: dialogue
      not_contains: lol
---
name: help lists the commands
turns:
  - say: /help
    expect: {skill: help}
"""


def test_a_candidate_that_breaks_a_scenario_stays_out_of_service_though_its_losses_pass(
    tmp_path, chinwag_model_cache
):
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(GREETING_SCENARIOS)
    settings = chinwag_test_settings(
        tmp_path,
        {
            "skills": {"dialogue": {"temperature": 0}},  # both sides answer greedily
            "trainers": {
                **TINY,
                "adapters": ["dialogue"],
                "lora": {**TINY["lora"], "learning_rate": 2e-3, "max_steps": 6},
                # No sign test can reach this: only the scenario check may hold it back.
                "gate_alpha": 1e-12,
                "gate_in_service": True,
                "gate_scenarios": [str(scenarios)],
            },
        },
        chinwag_model_cache,
    )
    asyncio.run(simulate_log(settings, poisoned=True, chats=20, skill="dialogue"))
    report = run_cycle(settings, settings.section("trainers", CycleConfig))
    r = report["adapters"]["dialogue"]
    assert r["decision"] == "rejected", r
    assert "a greeting is answered in words, not with lol" in r["why"]
    s = r["in_service_check"]["scenarios"]
    assert (s["checked"], s["in_service_passed"], s["candidate_passed"]) == (2, 2, 1)
    (broken,) = s["broken"]
    assert "lol" in broken["candidate"] and "reply contains 'lol'" in broken["candidate"]
    # The held-out questions went through the bot too, the candidate answering them there.
    asked = r["in_service_check"]["questions"]
    assert len(asked) == r["held_out"] and all(q["asked"] for q in asked)
    # (A question the bot declines as one of fact is declined with either adapter.)
    lol = [q for q in asked if q["candidate"].strip() == "lol"]
    assert len(lol) >= len(asked) / 2, [(q["asked"], q["candidate"]) for q in asked]
    assert sum(q["f1"][1] for q in asked) > sum(q["f1"][0] for q in asked)
    assert set(r["gate"]) >= {"answer F1 in service", "scenarios passed"}
    # What `chinwag train --now` prints for it.
    line = adapter_line("dialogue", r)
    assert line.startswith("dialogue: rejected") and "(scenarios 2 → 1 of 2)" in line
    assert "not with lol" in line
    assert AdapterRegistry.for_data_dir(settings.data_dir).current("dialogue") is None
    page = Path(settings.data_dir) / "adapters" / "dialogue" / r["version"] / "report"
    assert "Broken by the candidate" in (page / "report.html").read_text()


def test_the_shipped_scenarios_are_what_the_gate_holds_candidates_to_by_default():
    from trainers.in_service import gate_scenarios

    names = {s.name for s in gate_scenarios(None)}
    assert "a question nobody can support is declined, not invented" in names
    assert "a question about the guide gets a cited answer" in names
    assert gate_scenarios([]) == []


def test_too_little_data_skips_with_a_clear_reason_and_keeps_it_for_the_next_cycle(
    tmp_path, chinwag_model_cache
):
    settings = settings_for(tmp_path, chinwag_model_cache)
    asyncio.run(simulate_log(settings, chats=2))
    config = settings.section("trainers", CycleConfig)
    first = run_cycle(settings, config)
    assert first["adapters"]["companion"]["decision"] == "skipped"
    assert "fewer than min_examples 10" in first["adapters"]["companion"]["why"]
    kept = first["dataset"]["train"] + first["dataset"]["held_out"]
    assert kept > 0
    # A slow night's ratings are not lost: the next cycle carries them, beside its own.
    asyncio.run(simulate_log(settings, chats=2, skip=2))
    second = run_cycle(settings, config)
    assert second["dataset"]["carried"] == kept
    assert second["dataset"]["train"] + second["dataset"]["held_out"] >= 2 * kept - 1
    # Both nights are on the second night's page, each with why it trained nothing.
    from trainers.history import nights

    reports = Path(settings.data_dir) / "trainers" / "reports"
    assert [n.decision for n in nights(reports)["companion"]] == ["skipped", "skipped"]
    page = (reports / second["cycle"] / "report.html").read_text()
    assert page.count("fewer than min_examples 10") >= 3  # tonight's section, two rows


def test_only_one_cycle_runs_at_a_time(tmp_path):
    settings = settings_for(tmp_path, tmp_path)
    with cycle_lock(settings), pytest.raises(CycleBusy):
        run_cycle(settings, settings.section("trainers", CycleConfig))


async def test_a_promotion_and_a_rollback_are_served_without_restart(healthy, tmp_path):
    settings, report = healthy
    registry = AdapterRegistry.for_data_dir(settings.data_dir)
    first = registry.get("companion", report["adapters"]["companion"]["version"])
    second = registry.publish(
        "companion",
        lambda folder: [
            (folder / f.name).write_bytes(f.read_bytes()) for f in first.path.glob("adapter_*")
        ],
        {**first.meta, "note": "a copy, to have a second version"},
    )
    registry.promote("companion", first.version)
    bot = Bot(settings)
    await bot.start()
    try:
        bot.models.follow_interval_s = 0.1
        await bot.models.start()
        assert bot.models.adapters()["companion"] == first.version
        registry.promote("companion", second.version)
        await _until(lambda: bot.models.adapters().get("companion") == second.version)
        registry.rollback("companion")
        await _until(lambda: bot.models.adapters().get("companion") == first.version)
        generation = await bot.models.generate(
            [{"role": "user", "content": "hi"}], adapter="companion", max_new_tokens=3
        )
        assert generation.adapter_version == first.version  # logged on every reply
    finally:
        await bot.stop()


async def _until(condition, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def chinwag_train_now(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``chinwag train --now`` as an operator (or the schedule) runs it; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "train", "--now"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_killed_cycle_leaves_the_registry_alone_and_the_next_run_resumes(
    tmp_path, chinwag_model_cache
):
    lora = {**TINY["lora"], "max_steps": 40, "save_steps": 1}
    settings = settings_for(tmp_path, chinwag_model_cache, lora=lora)
    asyncio.run(simulate_log(settings, chats=20))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        CHINWAG_DATA_DIR=str(settings.data_dir),
        CHINWAG_MODELS__CACHE_DIR=str(chinwag_model_cache),
        CHINWAG_BOT__FALLBACK="fallback",
        # Resuming is under test here, not the gate: no answer check to wait for.
        CHINWAG_TRAINERS=json.dumps({**TINY, "gate_answers": 0, "lora": lora}),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "train", "--now"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = Path(settings.data_dir) / "trainers" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.rglob("checkpoint-2")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registry = AdapterRegistry.for_data_dir(settings.data_dir)
    assert registry.versions("companion") == [] and registry.current("companion") is None

    env["CHINWAG_TRAINERS"] = json.dumps(
        {**TINY, "gate_answers": 0, "lora": {**lora, "max_steps": 4}}
    )
    done = chinwag_train_now(env)
    reports = list((Path(settings.data_dir) / "trainers" / "reports").glob("*/report.json"))
    (report,) = [json.loads(p.read_text()) for p in reports]
    assert report["adapters"]["companion"]["resumed_from"].startswith("checkpoint-")
    assert "companion:" in done.stdout and "report:" in done.stdout
    # Piped, the cycle still says how far it got (rich's bars draw only on a terminal).
    assert "train: 4/4" in done.stderr and "log: 1/1" in done.stderr


def test_a_checkpoint_killed_while_writing_its_state_is_skipped_not_resumed(tmp_path):
    """A kill during ``trainer_state.json`` leaves it empty or cut; the run before it is used."""
    from trainers.lora import last_complete_checkpoint

    states = {1: '{"global_step": 1}', 2: '{"global_step": 2}', 3: "", 4: '{"glo'}
    for step, state in states.items():
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-5").mkdir()  # killed before the state file was begun

    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]


async def test_a_broken_trainers_section_stops_the_bot_at_start_not_at_3_am(tmp_path):
    from bot.config import ConfigError

    settings = settings_for(tmp_path, tmp_path, lora={"rank": 0}, held_out=0.9, nicee=3)
    with pytest.raises(ConfigError) as err:
        await Bot(settings).start()
    # Every mistake in one go, not one per restart.
    assert "trainers.lora.rank" in str(err.value)
    assert "trainers.held_out" in str(err.value)
    assert "trainers.nicee: unknown key" in str(err.value)


SENTIMENT_TINY = {
    "max_train_examples": 200,
    "max_eval_examples": 60,
    "epochs": 1,
    "head_init_examples": 200,
    "curve": False,
    "tune_min_replay": 32,
    "tune_epochs": 2,
}
SAID = {
    "The support team fixed everything in minutes, brilliant!": "positive",
    "My order arrived broken and nobody answers my emails.": "negative",
    "I will pick it up on Thursday.": "neutral",
}


def labelling_settings(tmp_path, sentiment_registry, cache, **sentiment):
    import shutil

    registry_dir = tmp_path / "adapters"
    shutil.copytree(sentiment_registry, registry_dir)
    return chinwag_test_settings(
        tmp_path,
        {
            "bot": {"fallback": "fallback"},
            "models": {"registry_dir": str(registry_dir)},
            "trainers": {"adapters": ["sentiment"], "sentiment": SENTIMENT_TINY | sentiment},
        },
        cache,
    )


async def label_messages(settings, said: dict[str, str], tag: str, repeats: int = 4) -> None:
    """Users write; an operator in each chat says what the message really was (``/label``)."""
    async with Bot(settings) as bot:
        bot.add_admin("test", "ops")
        for i, (text, label) in enumerate(said.items()):
            for j in range(repeats):
                chat = f"{tag}-{i}-{j}"
                words = f"{text} {['', 'Really.', 'Honestly.', 'Again.', 'Today.'][j % 5]}"
                await ChatUser(bot, chat_id=chat, user_id=f"{tag}u{i}{j}").send(words.strip())
                (ack,) = await ChatUser(bot, chat_id=chat, user_id="ops").send(f"/label {label}")
                assert label in ack.text
        await bot.store.flush()


async def test_operator_labels_tune_the_sentiment_classifier_through_the_gate(
    tmp_path, sentiment_registry, chinwag_model_cache
):
    settings = labelling_settings(tmp_path, sentiment_registry, chinwag_model_cache)
    await label_messages(settings, SAID, "night1")
    registry = AdapterRegistry(settings.models.registry_dir)
    current = registry.current("sentiment")
    config = settings.section("trainers", CycleConfig)
    report = await asyncio.to_thread(run_cycle, settings, config)  # a cycle is its own process
    r = report["adapters"]["sentiment"]
    assert r["mode"] == "tuned" and r["in_service"] == current.version
    assert r["new_labels"] == r["train_labels"] + r["held_out_labels"] == 12
    tuned = registry.get("sentiment", r["version"])
    assert tuned.meta["stage"] == "tuned" and tuned.meta["tuned_from"] == current.version
    # `chinwag adapters list` shows the figures the gate measured.
    assert tuned.meta["metrics"]["accuracy"] == r["candidate"]["original"]["accuracy"]
    # Scored on the users' own held-out messages and on the original held-out set, both ways.
    assert set(r["candidate"]["original"]) == {"accuracy", "macro_f1", "roc_auc", "n"}
    assert r["candidate"]["original"]["n"] == r["baseline"]["original"]["n"] == 60
    assert set(r["gate"]) == set(r["candidate"]) == set(r["baseline"])
    rejected = any(c["worse"] for c in r["gate"].values())
    assert r["decision"] == ("rejected" if rejected else "promoted")
    assert (registry.current("sentiment").version == r["version"]) is not rejected
    html = (tuned.path / "report" / "report.html").read_text()
    assert "original: macro_f1" in html and "only it labels right" in html and "<img" in html

    again = await asyncio.to_thread(run_cycle, settings, config)
    assert again["adapters"]["sentiment"]["decision"] == "skipped"  # no new labels

    # The next night's labels join the earlier ones rather than replacing them.
    furious = {"Where is my parcel? Third week now, I'm furious.": "negative"}
    await label_messages(settings, furious, "night3", repeats=3)
    # This time as an operator runs it: `chinwag train --now`, which says what happened.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        CHINWAG_DATA_DIR=str(settings.data_dir),
        CHINWAG_MODELS__CACHE_DIR=str(chinwag_model_cache),
        CHINWAG_MODELS__REGISTRY_DIR=str(settings.models.registry_dir),
        CHINWAG_TRAINERS=json.dumps({"adapters": ["sentiment"], "sentiment": SENTIMENT_TINY}),
    )
    done = await asyncio.to_thread(chinwag_train_now, env)
    assert "sentiment: " in done.stdout and "original accuracy" in done.stdout, done.stdout
    reports = sorted((Path(settings.data_dir) / "trainers" / "reports").glob("*/report.json"))
    third = json.loads(reports[-1].read_text())["adapters"]["sentiment"]
    assert third["new_labels"] == 3
    assert third["train_labels"] + third["held_out_labels"] == 15


async def test_an_operator_labelling_everything_wrong_does_not_get_a_worse_classifier_served(
    tmp_path, sentiment_registry, chinwag_model_cache
):
    opposite = {"positive": "negative", "negative": "positive", "neutral": "positive"}
    flipped = {text: opposite[label] for text, label in SAID.items()}
    # No original messages mixed in and a high learning rate: the candidate learns the
    # operator's mistakes thoroughly, and the original held-out set shows it.
    settings = labelling_settings(
        tmp_path,
        sentiment_registry,
        chinwag_model_cache,
        tune_min_replay=0,
        tune_replay=0,
        tune_epochs=8,
        tune_learning_rate=2e-3,
    )
    await label_messages(settings, flipped, "wrong", repeats=5)
    registry = AdapterRegistry(settings.models.registry_dir)
    before = registry.current("sentiment").version
    config = settings.section("trainers", CycleConfig)
    r = (await asyncio.to_thread(run_cycle, settings, config))["adapters"]["sentiment"]
    assert r["decision"] == "rejected", r
    assert r["gate"]["original"]["worse"] and "original labels right" in r["why"]
    assert registry.current("sentiment").version == before
