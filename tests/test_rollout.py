"""The embedded rollout engine: greedy output against a naive full-recompute loop, and the
properties a scheduler can silently break (continuous batching, chunked prefill, prefix sharing,
preemption), every stop condition, seeds, and the memory phases. The engine-level tests run on
CPU (the reference attention) and, marked gpu, on CUDA in fp32 with the Triton kernels and CUDA
graphs, where fp32 makes "equal to the naive loop" exact token for token."""
from __future__ import annotations

import math
import random
import signal
import sys
import time
import weakref

import pytest
import torch

from fastazr.kernels import attention_math
from fastazr.model import Decoder, ModelConfig
from fastazr.rollout import Engine, EngineConfig, Request, SamplingParams

# Odd sizes: GQA groups of 3, head_dim 12, a vocabulary that is no multiple of anything.
TINY = ModelConfig(architecture="qwen2", vocab_size=301, hidden_size=72, intermediate_size=100, num_layers=2,
                   num_heads=6, num_kv_heads=2, qkv_bias=True, max_position_embeddings=512, eos_token_ids=[7])
# a KV cache of 32 blocks of 4 tokens: small enough that the preemption test overflows it
SMALL_CACHE = 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4 * 4 * 32


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    return request.param


def tiny_model(seed: int = 0, device: str = "cpu") -> Decoder:
    model = Decoder(TINY, device=device, dtype=torch.float32)
    model.init_weights(seed)
    with torch.no_grad():
        # N(0, 0.02) weights give near-uniform logits; std 0.2 makes greedy choices decisive
        for name, p in model.named_parameters():
            if not name.endswith("norm") and not name.endswith("bias"):
                p.mul_(10.0)
    return model.eval()


def naive_greedy(model: Decoder, prompt: list[int], new_tokens: int, stop_ids=()) -> tuple[list[int], list[float]]:
    """Recompute the whole sequence for every token: no cache, no batching."""
    tokens, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            dev = model.device
            ids = torch.tensor(tokens, device=dev)
            hidden = model(ids, torch.arange(len(tokens), device=dev),
                           torch.tensor([0, len(tokens)], dtype=torch.int32, device=dev))
            logits = model.logits(hidden[-1:])[0]
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(logits.log_softmax(-1)[token]))
            if token in stop_ids:
                break
    return tokens[len(prompt):], logprobs


def prompts(count: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(8, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def engine(model, **overrides) -> Engine:
    options = dict(block_size=4, kv_cache_bytes=SMALL_CACHE * 4, max_num_batched_tokens=64, max_num_seqs=8)
    return Engine(model, config=EngineConfig(**{**options, **overrides}))


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_greedy_equals_naive_recompute(device, cuda_graphs):
    model = tiny_model(device=device)
    batch = prompts(6)
    results = engine(model, cuda_graphs=cuda_graphs).generate([Request(p, GREEDY) for p in batch])
    for prompt, (completion,) in zip(batch, results):
        want_ids, want_logprobs = naive_greedy(model, prompt, GREEDY.max_new_tokens)
        assert completion.prompt_ids == prompt
        assert completion.completion_ids == want_ids
        assert completion.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(want_logprobs),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("exact", [True, False])
def test_the_kernel_decode_path_equals_naive_recompute(monkeypatch, exact):
    """The runner's CUDA path on CPU, its Triton kernels under the interpreter (no graphs):
    exact decodes through the prefill kernel with each sequence's key chunks spread over
    programs and folded (KEY_CHUNK made 64, so contexts of 70-133 tokens span 2-3 chunks and
    the split plan changes mid-generation), the metadata advanced by one kernel, the rotary
    and cache write inside the attention (exact) or cos and sin gathered from the rotary table
    (inexact); against the naive recompute. The prompts outgrow the step's
    token budget, so some steps mix one sequence's decode with another's prefill chunk: their
    decodes spread over programs too. Inexact mode: the split-K decode kernel, in both kinds
    of step."""
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    model = tiny_model()
    eng = engine(model, cuda_graphs=False, decode_steps=4, exact_logprobs=exact)
    eng.runner.kernels, eng.runner.num_sms = True, 132
    plans, mixed = [], []
    splits = eng.runner._splits

    def recorded(*args):
        plan = splits(*args)
        (mixed if sys._getframe(1).f_code.co_name == "_eager_kernels" else plans).append(plan)
        return plan

    monkeypatch.setattr(eng.runner, "_splits", recorded)
    g = torch.Generator().manual_seed(5)
    batch = [torch.randint(8, TINY.vocab_size, (n,), generator=g).tolist() for n in (70, 100, 121)]
    results = eng.generate([Request(p, GREEDY) for p in batch])
    for prompt, (completion,) in zip(batch, results):
        want_ids, want_logprobs = naive_greedy(model, prompt, GREEDY.max_new_tokens)
        assert completion.completion_ids == want_ids
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(want_logprobs), rtol=0, atol=1e-4)
    if not exact:
        return
    assert plans[0] == (2, 8) and plans[-1] == (4, 8), f"the longest context should cross 2 chunks: {plans}"
    assert any(programs > 1 for programs, _ in mixed), f"no decode of a step with a prefill chunk split: {mixed}"


def test_the_rotary_table_holds_each_positions_rotary(device):
    """A decode pass gathers cos and sin from the runner's table of every position
    (Runner._rotary): each row must be model.rotary's bits for its position, up to the last."""
    model = tiny_model(device=device)
    eng = engine(model)
    eng.generate([Request(prompts(1)[0], GREEDY)])  # a decode round builds the table
    positions = torch.tensor([0, 1, 17, 255, 300, TINY.max_position_embeddings - 1], device=device)
    assert all(len(rows) == TINY.max_position_embeddings for rows in eng.runner._rotary)
    for rows, want in zip(eng.runner._rotary, model.rotary(positions)):
        assert torch.equal(rows.index_select(0, positions.int()), want)


SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=60, max_new_tokens=10, ignore_eos=True)


def requests_mix(seed: int = 3) -> list[Request]:
    """Greedy, sampled and multi-sample requests of ragged lengths, each sampled one seeded."""
    batch = prompts(7, seed=seed)
    out = []
    for i, p in enumerate(batch):
        params = GREEDY if i % 3 == 0 else SamplingParams(**{**SAMPLED.__dict__, "seed": 100 + i})
        out.append(Request(p, params, n=1 + i % 3))
    return out


def ids(results):
    return [[c.completion_ids for c in group] for group in results]


def test_continuous_batching_equals_one_request_at_a_time(device):
    model = tiny_model(device=device)
    batch = requests_mix()
    together = engine(model).generate(batch)
    alone = [engine(model).generate([r])[0] for r in batch]
    assert ids(together) == ids(alone)
    for a, b in zip(together, alone):
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)


def test_chunked_prefill_changes_nothing(device):
    model = tiny_model(device=device)
    batch = requests_mix(seed=4)
    whole = Engine(model, config=EngineConfig(block_size=4, kv_cache_bytes=SMALL_CACHE * 4)).generate(batch)
    tiny_budget = engine(model, max_num_batched_tokens=8, max_num_seqs=4)
    chunked = tiny_budget.generate(batch)
    assert ids(chunked) == ids(whole)
    default = engine(model)
    default.generate(batch)
    assert tiny_budget.stats["steps"] > default.stats["steps"]


def test_prefix_sharing_on_and_off_give_the_same_samples(device):
    model = tiny_model(device=device)
    prompt = prompts(1, seed=5, low=30, high=31)[0]
    batch = [Request(prompt, SamplingParams(**{**SAMPLED.__dict__, "seed": 9}), n=6),
             Request(prompt[:17] + [11, 12], GREEDY, n=2),
             Request(prompt[3:19], GREEDY, n=2)]
    shared, unshared = engine(model), engine(model, prefix_sharing=False)
    assert ids(shared.generate(batch)) == ids(unshared.generate(batch))
    # The five followers reuse their leader's 7 full prompt blocks (28 of 30 tokens). The second
    # prompt's leader starts in the first step beside the first's, before anything is cached; its
    # follower then reuses 4 full blocks (16 of 19 tokens). The 16-token prompt is 4 whole
    # blocks; its follower reuses 3, since its last token must be computed for its logits.
    assert shared.stats["cached_tokens"] == 5 * 28 + 16 + 12
    assert unshared.stats["cached_tokens"] == 0
    assert shared.stats["computed_tokens"] < unshared.stats["computed_tokens"] - 5 * 28


def test_preemption_recomputes_and_matches_naive(device):
    """A cache of 12 blocks of 4 tokens for 4 sequences of up to 30 tokens each: the scheduler
    must preempt and recompute, and greedy output must not notice."""
    model = tiny_model(device=device)
    batch = prompts(4, seed=6, low=14, high=19)
    params = SamplingParams(temperature=0.0, max_new_tokens=11, ignore_eos=True)
    small = engine(model, kv_cache_bytes=SMALL_CACHE // 32 * 12)
    results = small.generate([Request(p, params) for p in batch])
    assert small.stats["preemptions"] > 0
    for prompt, (completion,) in zip(batch, results):
        assert completion.completion_ids == naive_greedy(model, prompt, 11)[0]


def test_stops_read_back_a_step_late_with_preemption_change_nothing(device, monkeypatch):
    """The host reads a step's tokens back while the next step runs: a sequence that stops has
    computed one extra token, and one preempted in that window stops from the waiting queue.
    Each of 6 sequences stops on a token of its own free run, in a cache that forces preemption
    (seed and sizes chosen so that one stop arrives while preempted); completions, logprobs and
    every block must come out as if each ran alone."""
    from fastazr.rollout.scheduler import Scheduler

    model = tiny_model(device=device)
    batch = prompts(6, seed=26, low=10, high=19)
    requests, wants = [], []
    for i, prompt in enumerate(batch):
        free_run, logprobs = naive_greedy(model, prompt, 14)
        stop = free_run[3 + i % 5]
        end = free_run.index(stop) + 1
        requests.append(Request(prompt, SamplingParams(temperature=0.0, max_new_tokens=14, stop_token_ids=(stop,),
                                                        ignore_eos=True)))
        wants.append((free_run[:end], logprobs[:end]))
    finished_waiting = []
    finish = Scheduler.finish

    def counting(self, seq):
        finished_waiting.append(seq not in self.running)
        finish(self, seq)

    monkeypatch.setattr(Scheduler, "finish", counting)
    small = engine(model, kv_cache_bytes=SMALL_CACHE // 32 * 12)
    results = small.generate(requests)
    assert small.stats["preemptions"] > 0 and any(finished_waiting)
    for (completion,), (tokens, logprobs) in zip(results, wants):
        assert completion.completion_ids == tokens and completion.finish_reason == "stop_token"
        assert completion.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert small.blocks.num_free == small.blocks.num_blocks


def test_stop_token_eos_length_and_context_limit(device):
    model = tiny_model(device=device)
    prompt = prompts(1, seed=7)[0]
    free_run, _ = naive_greedy(model, prompt, 12)
    stop_at = free_run[4]
    first = free_run.index(stop_at)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop_at,))
    (completion,), = engine(model).generate([Request(prompt, params)])
    assert completion.completion_ids == free_run[:first + 1] and completion.finish_reason == "stop_token"

    model.config.eos_token_ids = [stop_at]
    (completion,), = engine(model).generate([Request(prompt, SamplingParams(temperature=0.0, max_new_tokens=12))])
    assert completion.completion_ids == free_run[:first + 1] and completion.finish_reason == "eos"
    (completion,), = engine(model).generate([Request(prompt, GREEDY)])  # ignore_eos
    assert completion.completion_ids == free_run and completion.finish_reason == "length"

    limited = engine(model, max_model_len=len(prompt) + 3)
    (completion,), (too_long,) = limited.generate([Request(prompt, GREEDY), Request(prompt + [9] * 3, GREEDY)])
    assert completion.completion_ids == free_run[:3] and completion.finish_reason == "length"
    assert too_long.completion_ids == [] and too_long.finish_reason == "prompt_too_long"


def test_decode_rounds_equal_one_pass_per_round_trip(device):
    """decode_steps passes per host round trip against one: rows whose limit falls inside a round
    (ragged max_new_tokens) must stop advancing and write their extra passes to scratch, a stop
    token read back mid-round must cut the completion there, followers share prompt blocks, and a
    cache too small for everyone preempts; none of it may change a token or leak a block."""
    model = tiny_model(device=device)
    batch = requests_mix(seed=12)
    for i, prompt in enumerate(prompts(6, seed=13)):
        free_run, _ = naive_greedy(model, prompt, 13)
        stops = (free_run[2 + i],) if i % 2 else ()
        batch.append(Request(prompt, SamplingParams(temperature=0.0, max_new_tokens=1 + 2 * i, stop_token_ids=stops,
                                                    ignore_eos=True)))
    want = engine(model, decode_steps=1).generate(batch)
    assert any(c.finish_reason == "stop_token" for group in want for c in group)
    for overrides in (dict(), dict(decode_steps=5), dict(decode_steps=5, kv_cache_bytes=SMALL_CACHE // 32 * 12)):
        eng = engine(model, **overrides)
        got = eng.generate(batch)
        assert ids(got) == ids(want), overrides
        for a, b in zip(got, want):
            for x, y in zip(a, b):
                assert x.finish_reason == y.finish_reason
                torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)
        assert eng.stats["passes"] > eng.stats["steps"], "decode rounds should run several passes"
        assert eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.stats["preemptions"] > 0


def test_a_decode_round_takes_only_the_blocks_there_are():
    from fastazr.rollout.blocks import BlockManager
    from fastazr.rollout.scheduler import Scheduler
    from fastazr.rollout.sequence import Sequence

    blocks = BlockManager(num_blocks=3, block_size=4, prefix_sharing=False)
    scheduler = Scheduler(EngineConfig(block_size=4, decode_steps=8, max_num_seqs=2, max_num_batched_tokens=8),
                          blocks, max_len=100)
    seq = Sequence(tokens=list(range(6)), num_prompt=6, params=SamplingParams(max_new_tokens=20), seed=0, sample=0)
    scheduler.add(seq)
    (prefill,) = scheduler.schedule()
    assert (prefill.count, prefill.steps, len(seq.blocks)) == (6, 1, 2)
    seq.num_computed, seq.tokens = 6, seq.tokens + [9]
    (decode,) = scheduler.schedule()
    # 8 passes need blocks for 14 tokens (4 > 3 in all): the round runs what 2 blocks hold
    assert (decode.start, decode.count, decode.steps, len(seq.blocks)) == (6, 1, 2, 2)
    # the blocks would hold 2 more tokens, max_new_tokens allows only 1
    seq.params = SamplingParams(max_new_tokens=2)
    (decode,) = scheduler.schedule()
    assert decode.steps == 1, "a round never passes max_new_tokens (1 of 2 taken)"


class CharTokenizer:
    """Token i decodes to one letter: enough for the engine's stop-string check."""
    stop_token_ids: list[int] = []

    def decode(self, token_ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + t % 26) for t in token_ids)


def test_stop_string_ends_the_completion_at_the_token_that_completes_it():
    model = tiny_model()
    prompt = prompts(1, seed=8)[0]
    free_run, _ = naive_greedy(model, prompt, 12)
    text = CharTokenizer().decode(free_run)
    stop = text[5:8]
    end = text.index(stop) + len(stop)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=("zzzzzzzzzz", stop))
    (completion,), = Engine(model, CharTokenizer(), EngineConfig(block_size=4)).generate([Request(prompt, params)])
    assert completion.completion_ids == free_run[:end] and completion.finish_reason == "stop_string"
    with pytest.raises(ValueError, match="stop_strings needs a tokenizer"):
        engine(model).generate([Request(prompt, params)])


def test_seeds_make_samples_reproducible_and_distinct(device):
    model = tiny_model(device=device)
    prompt = prompts(1, seed=9)[0]
    seeded = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=42)
    a = engine(model).generate([Request(prompt, seeded, n=3)])[0]
    b = engine(model, prefix_sharing=False).generate([Request(prompt, seeded, n=3)])[0]
    assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
    assert len({tuple(c.completion_ids) for c in a}) == 3
    # seed 42's second sample and seed 43's first are different draws
    neighbour = SamplingParams(**{**seeded.__dict__, "seed": 43})
    assert engine(model).generate([Request(prompt, neighbour)])[0][0].completion_ids != a[1].completion_ids
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    c = engine(model).generate([Request(prompt, unseeded), Request(prompt, unseeded)])
    assert c[0][0].completion_ids != c[1][0].completion_ids


def test_release_resume_and_weight_updates(device):
    model = tiny_model(device=device)
    batch = prompts(3, seed=10)
    eng = engine(model)
    before = eng.generate([Request(p, GREEDY) for p in batch])
    cache = eng.cache
    eng.release_memory()
    assert eng.cache is None
    gone = weakref.ref(cache.k)
    del cache
    assert gone() is None, "the KV cache tensors must be freed on release"
    with pytest.raises(RuntimeError, match="resume_memory"):
        eng.generate([Request(batch[0], GREEDY)])
    eng.resume_memory()
    assert ids(eng.generate([Request(p, GREEDY) for p in batch])) == ids(before)

    # The engine reads the model's own tensors: an in-place update is what it generates with,
    # and weights_updated() keeps the prefix cache from serving keys of the old weights.
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.qkv_weight.mul_(1.3)
    eng.weights_updated()
    after = eng.generate([Request(p, GREEDY) for p in batch])
    for prompt, (completion,) in zip(batch, after):
        assert completion.completion_ids == naive_greedy(model, prompt, GREEDY.max_new_tokens)[0]
    assert ids(after) != ids(before)


def sampling_rows(rows: int, temperature=1.0, top_k=0, top_p=1.0):
    from fastazr.rollout.sampler import SamplingBatch
    return SamplingBatch(temperature=torch.full((rows,), temperature), top_k=torch.full((rows,), top_k),
                         top_p=torch.full((rows,), top_p), seeds=torch.arange(rows) * 7919 + 1,
                         samples=torch.zeros(rows, dtype=torch.long),
                         steps=torch.full((rows,), 3), any_top_k=top_k > 0, any_top_p=top_p < 1.0,
                         all_greedy=temperature == 0)


@pytest.mark.parametrize("temperature, top_k, top_p, support", [
    (1.0, 0, 1.0, 6), (0.7, 0, 1.0, 6), (1.0, 2, 1.0, 2), (1.0, 0, 0.5, 2), (1.0, 0, 0.8, 3), (1.0, 3, 0.8, 2)])
def test_sampler_draws_from_the_filtered_softmax(temperature, top_k, top_p, support):
    """8000 seeds over probabilities (0.4, 0.3, 0.15, 0.1, 0.04, 0.01): frequencies match the
    renormalized kept set within 4 standard errors. top_p=0.5 keeps the first two tokens (the
    mass before the second, 0.4, is under 0.5); top_p=0.8 keeps three, but after top_k=3 only two
    (renormalized over the top 3, the mass before the third is 0.82)."""
    from fastazr.rollout.sampler import sample
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.04, 0.01])
    rows = 8000
    logits = probs.log().repeat(rows, 1)
    tokens, logprobs = sample(logits, sampling_rows(rows, temperature, top_k, top_p))
    want = (probs.log() / temperature).softmax(-1)[:support]
    want = want / want.sum()
    freq = torch.bincount(tokens, minlength=6).float() / rows
    assert (freq[support:] == 0).all()
    assert ((freq[:support] - want).abs() <= 4 * (want * (1 - want) / rows).sqrt() + 1e-3).all(), (freq, want)
    torch.testing.assert_close(logprobs, (probs.log() / temperature).log_softmax(-1)[tokens])


def test_a_top_p_of_one_keeps_every_token_beside_rows_that_filter():
    """The fp32 cumsum of a peaked softmax reaches 1.0 before its tail, so a top_p = 1.0 row lost
    its tail whenever another row of the batch asked for top_p < 1 (65,536 tokens: one at
    probability 0.997, the rest 4e-8 each; 4,090 were cut). Seed 11,720,121 draws tail token
    24,061 alone, one of those (found by sampling 4,096 seeds once)."""
    from fastazr.rollout.sampler import _filter, sample
    logits = torch.full((2, 65536), math.log(4e-8))
    logits[:, 0] = 0.0
    mixed = sampling_rows(2)
    mixed.seeds[0] = 11_720_121
    mixed.top_p[1], mixed.any_top_p = 0.5, True
    filtered = _filter(logits, mixed)
    assert torch.isfinite(filtered[0]).all() and int(torch.isfinite(filtered[1]).sum()) == 1
    alone = sampling_rows(1)
    alone.seeds[0] = 11_720_121
    drawn = sample(logits[:1], alone)[0]
    assert drawn.item() != 0 and torch.equal(sample(logits, mixed)[0][:1], drawn)


def test_sampler_greedy_rows_and_noise_depend_only_on_seed_and_step():
    from fastazr.rollout.sampler import sample
    from fastazr.kernels.sampling_reference import uniform_noise
    logits = torch.randn(5, 301)
    tokens, _ = sample(logits, sampling_rows(5, temperature=0.0))
    assert torch.equal(tokens, logits.argmax(-1))
    seeds = torch.tensor([1, 2, 1, 1, 1 + 2 ** 32])
    samples, steps = torch.tensor([0, 0, 0, 1, 0]), torch.tensor([0, 0, 1, 0, 0])
    noise = uniform_noise(seeds, samples, steps, 301)
    assert torch.equal(noise[0], uniform_noise(seeds[:1], samples[:1], steps[:1], 301)[0])
    for other in range(1, 5):  # another seed, step, sample, or only the seed's high bits differ
        assert not torch.equal(noise[0], noise[other])
    assert 0 < noise.min() and noise.max() < 1


def test_embedded_model_greedy_equals_naive_and_stops_on_text():
    """SmolLM2-135M (the embedded default) with its real tokenizer: greedy completions of two
    chat prompts (one with 3 samples sharing its prompt) equal the naive loop, and a stop string
    taken from the middle of a completion's text ends it at the token that completes it."""
    from fastazr.model import load

    model, tokenizer = load("default")
    chats = ["Write a Python function that adds two numbers.", "What is 2 + 3? Answer briefly."]
    batch = [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in chats]
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    eng = Engine(model, tokenizer, EngineConfig(block_size=16))
    results = eng.generate([Request(batch[0], params, n=3), Request(batch[1], params)])
    for prompt, group in zip(batch, results):
        want, _ = naive_greedy(model, prompt, 16, stop_ids=set(tokenizer.stop_token_ids))
        for completion in group:
            assert completion.completion_ids == want
    text = tokenizer.decode(results[0][0].completion_ids)
    stop = text[len(text) // 2:len(text) // 2 + 4]
    (stopped,), = eng.generate([Request(batch[0], SamplingParams(temperature=0.0, max_new_tokens=16,
                                                                 stop_strings=(stop,)))])
    assert stopped.finish_reason == "stop_string"
    assert stop in tokenizer.decode(stopped.completion_ids)
    assert stop not in tokenizer.decode(stopped.completion_ids[:-1])


def test_a_failing_step_gives_every_block_back(monkeypatch):
    model = tiny_model()
    eng = engine(model)
    calls = []
    decode = eng.runner.decode

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return decode(*args)

    monkeypatch.setattr(eng.runner, "decode", failing)
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate([Request(p, GREEDY) for p in prompts(5, seed=11)])
    assert eng.blocks.num_free == eng.blocks.num_blocks


class Interrupt(Exception):
    pass


def test_interrupts_anywhere_in_generate_leak_no_block():
    """A signal handler's exception (Ctrl-C, an alarm) lands between any two bytecodes of
    generate(). Admission held prefix blocks for a sequence popped from the queue before it was
    running, grow() took a block before recording it, and the clean-up freed running sequences'
    blocks only: 44 of 3,000 timer interrupts leaked blocks for good, after which a prompt of
    max_len - 1 tokens found no room ("the scheduler found nothing to run"). One-token blocks and
    28 sequences whose prompts are cached make admission (prefix lookups block by block) a large
    share of a call: ~15% of these interrupts leaked. Afterwards every block must be free, the
    longest prompt must run, and the prefix cache the interrupted calls left must serve correct
    blocks, and autograd must be on as before."""
    model = tiny_model()
    one_token_block = 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4
    eng = Engine(model, config=EngineConfig(block_size=1, kv_cache_bytes=one_token_block * 513, decode_steps=1,
                                            max_num_batched_tokens=2048, max_num_seqs=32))
    assert eng.max_len == eng.blocks.num_blocks == 512
    params = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    batch = [Request(p, params, n=4) for p in prompts(7, seed=1, low=60, high=64)]
    want = ids(eng.generate(batch))
    start = time.perf_counter()
    eng.generate(batch)
    shortest = time.perf_counter() - start

    def interrupt(signum, frame):
        raise Interrupt

    rng = random.Random(0)
    interrupted = 0
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        for _ in range(300):
            try:
                # anywhere in a call: before the shortest one seen ends (calls vary on a busy machine)
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, shortest))
                start = time.perf_counter()
                eng.generate(batch)
                shortest = min(shortest, time.perf_counter() - start)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except Interrupt:
                interrupted += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted >= 200, "too few calls were interrupted to test anything"
    # an interrupt inside torch.no_grad's __enter__ left autograd off for the whole process
    assert torch.is_grad_enabled()
    longest = prompts(1, seed=2, low=511, high=512)[0]
    (completion,), = eng.generate([Request(longest, params)])
    assert completion.finish_reason == "length" and len(completion.completion_ids) == 1
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert ids(eng.generate(batch)) == want


def test_prefix_keys_stay_flat_for_long_prompts():
    """20,000-token prompts: a key per block of fixed size (nested keys would recurse per block)."""
    from fastazr.rollout.blocks import BlockManager
    from fastazr.rollout.sequence import Sequence

    manager = BlockManager(num_blocks=3000, block_size=16, prefix_sharing=True)
    tokens = torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)).tolist()
    first = Sequence(tokens=list(tokens), num_prompt=len(tokens), params=GREEDY, seed=0, sample=0)
    assert manager.grow(first, len(tokens))
    first.num_computed = len(tokens)
    manager.register(first)
    second = Sequence(tokens=list(tokens), num_prompt=len(tokens), params=GREEDY, seed=0, sample=1)
    manager.share_prefix(second)
    assert second.blocks == first.blocks[:(len(tokens) - 1) // 16]
    manager.release(first)
    manager.release(second)
    assert manager.num_free == 3000
