"""The rollout engine's inputs checked at its boundary (issue 20, part 3): each case is the input
that used to corrupt a generation silently or fail far from its cause, and must now be refused
with an error naming the field, or taken as meant. Tiny random model on CPU."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastazr.rollout import Engine, EngineConfig, Request, SamplingParams
from fastazr.rollout.request import MIN_TEMPERATURE, TOP_K_MAX
from test_rollout import GREEDY, TINY, engine, naive_greedy, prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# (what is built, its arguments, the error, a pattern its message matches: the field's name)
REFUSED = [
    # negative ids read as placeholders of other sequences' sampled tokens
    (Request, dict(prompt_ids=[12, 13, -1, 14]), ValueError, r"Request\.prompt_ids\[2\] is -1"),
    (Request, dict(prompt_ids=[-1]), ValueError, r"Request\.prompt_ids\[0\] is -1"),
    # a str is its characters, floats truncated, bools are 0 and 1
    (Request, dict(prompt_ids="123"), TypeError, r"Request\.prompt_ids must be token ids, got a str"),
    (Request, dict(prompt_ids=[1, 2.7]), TypeError, r"Request\.prompt_ids\[1\] must be an int"),
    (Request, dict(prompt_ids=[2.0]), TypeError, r"Request\.prompt_ids\[0\] must be an int"),
    (Request, dict(prompt_ids=[True, 5]), TypeError, r"Request\.prompt_ids\[0\] must be an int"),
    (Request, dict(prompt_ids=torch.tensor([1.0, 2.0])), TypeError, r"Request\.prompt_ids\[0\] must be an int"),
    (Request, dict(prompt_ids=torch.tensor([[1, 2]])), ValueError, r"Request\.prompt_ids must be 1-D"),
    (Request, dict(prompt_ids=[2 ** 64]), ValueError, r"Request\.prompt_ids\[0\] must be in"),
    (Request, dict(prompt_ids=[]), ValueError, r"Request\.prompt_ids is empty"),
    (Request, dict(prompt_ids=np.array([], np.int64)), ValueError, r"Request\.prompt_ids is empty"),
    (Request, dict(prompt_ids=[1], n=2.5), TypeError, r"Request\.n must be an int"),
    (Request, dict(prompt_ids=[1], n=True), TypeError, r"Request\.n must be an int"),
    (Request, dict(prompt_ids=[1], n=0), ValueError, r"Request\.n must be >= 1"),
    (Request, dict(prompt_ids=[1], params=dict(temperature=0.0)), TypeError, r"Request\.params must be"),
    # logits / 1e-38 overflows fp32: NaN logprobs, tokens that are not the argmax
    (SamplingParams, dict(temperature=1e-38), ValueError, r"SamplingParams\.temperature must be 0 \(greedy\) or >="),
    (SamplingParams, dict(temperature=MIN_TEMPERATURE / 2), ValueError, r"SamplingParams\.temperature"),
    (SamplingParams, dict(temperature=-1.0), ValueError, r"SamplingParams\.temperature"),
    (SamplingParams, dict(temperature=float("nan")), ValueError, r"SamplingParams\.temperature must be a finite"),
    (SamplingParams, dict(temperature=float("inf")), ValueError, r"SamplingParams\.temperature must be a finite"),
    (SamplingParams, dict(temperature="1.0"), TypeError, r"SamplingParams\.temperature must be a number"),
    (SamplingParams, dict(top_p=float("nan")), ValueError, r"SamplingParams\.top_p"),
    (SamplingParams, dict(top_p=0.0), ValueError, r"SamplingParams\.top_p must be in \[1e-30, 1\]"),
    # 0 once in the engine's fp32 table: every token dropped, token 0 drawn at every step
    (SamplingParams, dict(top_p=1e-46), ValueError, r"SamplingParams\.top_p must be in \[1e-30, 1\]"),
    (SamplingParams, dict(top_p=True), TypeError, r"SamplingParams\.top_p must be a number"),
    # int64 overflow in the sampler's parameter table
    (SamplingParams, dict(top_k=2 ** 63), ValueError, r"SamplingParams\.top_k must be in \[0, 2147483647\]"),
    (SamplingParams, dict(top_k=-1), ValueError, r"SamplingParams\.top_k"),
    (SamplingParams, dict(top_k=2.5), TypeError, r"SamplingParams\.top_k must be an int"),
    # passed validation, then failed inside generate()
    (SamplingParams, dict(max_new_tokens=2.5), TypeError, r"SamplingParams\.max_new_tokens must be an int"),
    (SamplingParams, dict(max_new_tokens=True), TypeError, r"SamplingParams\.max_new_tokens must be an int"),
    (SamplingParams, dict(max_new_tokens=0), ValueError, r"SamplingParams\.max_new_tokens must be >= 1"),
    (SamplingParams, dict(seed=2.5), TypeError, r"SamplingParams\.seed must be an int"),
    (SamplingParams, dict(seed=-1), ValueError, r"SamplingParams\.seed must be in"),
    (SamplingParams, dict(stop_token_ids=(-1,)), ValueError, r"SamplingParams\.stop_token_ids\[0\] is -1"),
    (SamplingParams, dict(stop_token_ids=(3.5,)), TypeError, r"SamplingParams\.stop_token_ids\[0\] must be an int"),
    (SamplingParams, dict(stop_token_ids="7"), TypeError, r"SamplingParams\.stop_token_ids must be token ids"),
    (SamplingParams, dict(stop_strings=("ok", "")), ValueError, r"SamplingParams\.stop_strings\[1\] is empty"),
    (SamplingParams, dict(stop_strings=(3,)), TypeError, r"SamplingParams\.stop_strings\[0\] must be a str"),
    (SamplingParams, dict(stop_strings=3), TypeError, r"SamplingParams\.stop_strings must be a str or"),
    (SamplingParams, dict(ignore_eos="no"), TypeError, r"SamplingParams\.ignore_eos must be True or False"),
    (EngineConfig, dict(block_size=3), ValueError, r"EngineConfig\.block_size must be a power of two"),
    (EngineConfig, dict(block_size=4.0), TypeError, r"EngineConfig\.block_size must be an int"),
    (EngineConfig, dict(kv_memory_fraction=float("nan")), ValueError, r"EngineConfig\.kv_memory_fraction"),
    (EngineConfig, dict(kv_memory_fraction=1.5), ValueError, r"EngineConfig\.kv_memory_fraction must be in"),
    (EngineConfig, dict(kv_cache_bytes=1e9), TypeError, r"EngineConfig\.kv_cache_bytes must be an int"),
    (EngineConfig, dict(kv_cache_bytes=0), ValueError, r"EngineConfig\.kv_cache_bytes must be >= 1"),
    (EngineConfig, dict(max_num_seqs=8.0), TypeError, r"EngineConfig\.max_num_seqs must be an int"),
    (EngineConfig, dict(max_num_seqs=8, max_num_batched_tokens=4), ValueError,
     r"EngineConfig\.max_num_batched_tokens must be >= 8"),
    (EngineConfig, dict(max_num_batched_tokens="8192"), TypeError,
     r"EngineConfig\.max_num_batched_tokens must be an int"),
    (EngineConfig, dict(max_model_len=1200.0), TypeError, r"EngineConfig\.max_model_len must be an int"),
    (EngineConfig, dict(max_model_len=1), ValueError, r"EngineConfig\.max_model_len must be >= 2"),
    (EngineConfig, dict(decode_steps=0), ValueError, r"EngineConfig\.decode_steps must be >= 1"),
    (EngineConfig, dict(decode_steps=True), TypeError, r"EngineConfig\.decode_steps must be an int"),
    (EngineConfig, dict(prefix_sharing="no"), TypeError, r"EngineConfig\.prefix_sharing must be True or False"),
    (EngineConfig, dict(cuda_graphs=0), TypeError, r"EngineConfig\.cuda_graphs must be True or False"),
    (EngineConfig, dict(exact_logprobs=None), TypeError, r"EngineConfig\.exact_logprobs must be True or False"),
    (EngineConfig, dict(sample_in_lm_head="yes"), TypeError, r"EngineConfig\.sample_in_lm_head must be True or"),
]


@pytest.mark.parametrize("build, kwargs, error, message", REFUSED,
                         ids=[f"{b.__name__}-{'-'.join(map(str, k))}" for b, k, _, _ in REFUSED])
def test_bad_fields_are_refused_with_their_name(build, kwargs, error, message):
    with pytest.raises(error, match=message):
        build(**kwargs)


def test_ids_outside_the_vocabulary_are_refused_before_they_run(model):
    eng = engine(model)
    other = Request([20, 21, 22], GREEDY)
    # 2**32 - 1 wrapped through int32 to -1 (a placeholder); 301 == vocab_size raised a bare IndexError
    for bad, position in (([12, 2 ** 32 - 1], 1), ([5, 6, TINY.vocab_size], 2)):
        with pytest.raises(ValueError, match=rf"requests\[1\]\.prompt_ids\[{position}\] is {bad[position]}: "
                                             rf"token ids must be in \[0, {TINY.vocab_size}\)"):
            eng.generate([other, Request(bad, GREEDY)])
    stop_outside = SamplingParams(temperature=0.0, max_new_tokens=4, stop_token_ids=(TINY.vocab_size,))
    with pytest.raises(ValueError, match=r"requests\[0\]\.params\.stop_token_ids\[0\]"):
        eng.generate([Request([5], stop_outside)])
    # [-1] on an engine's second call ran as the first call's first sampled token; a Request's
    # fields can be reassigned after it checked them, so the engine checks the lower bound too
    eng.generate([other])
    late = Request([5], GREEDY)
    late.prompt_ids = [-1]
    with pytest.raises(ValueError, match=r"requests\[0\]\.prompt_ids\[0\] is -1"):
        eng.generate([late])
    with pytest.raises(TypeError, match="takes a list of Requests"):
        eng.generate(other)
    with pytest.raises(TypeError, match=r"requests\[0\] must be a Request"):
        eng.generate([[5, 6]])
    # a refused call leaves the engine as it was
    (completion,), = eng.generate([other])
    assert completion.completion_ids == naive_greedy(model, other.prompt_ids, GREEDY.max_new_tokens)[0]
    assert eng.blocks.num_free == eng.blocks.num_blocks


@pytest.mark.parametrize("change, error, message", [
    (lambda r: setattr(r.params, "temperature", math.nan), ValueError,
     r"requests\[0\]\.params: SamplingParams\.temperature"),  # drew token 0 every step, NaN logprobs
    (lambda r: setattr(r.params, "max_new_tokens", 0), ValueError, r"requests\[0\]\.params: .*max_new_tokens"),
    (lambda r: setattr(r.params, "seed", -5), ValueError, r"requests\[0\]\.params: SamplingParams\.seed"),
    (lambda r: setattr(r, "prompt_ids", []), ValueError, r"requests\[0\]\.prompt_ids must be a non-empty list"),
    (lambda r: setattr(r, "params", None), TypeError, r"requests\[0\]\.params must be a SamplingParams"),
    (lambda r: setattr(r, "n", 0), ValueError, r"requests\[0\]\.n"),
])
def test_fields_changed_after_a_request_was_built_are_checked_by_generate(model, change, error, message):
    eng = engine(model)
    late = Request([5, 6, 7], SamplingParams(temperature=1.0, max_new_tokens=3, seed=1))
    change(late)
    with pytest.raises(error, match=message):
        eng.generate([late])
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_tensor_and_array_prompts_are_their_ids(model):
    """A 1-D integer tensor or array raised "ambiguous truth value", and torch.tensor([0]) was
    called empty; both must run as the list of their values."""
    prompt = prompts(1, seed=3)[0]
    for given in (torch.tensor([0]), np.array([0]), torch.tensor([0], dtype=torch.int32)):
        assert Request(given).prompt_ids == [0] and type(Request(given).prompt_ids[0]) is int
    as_list = engine(model).generate([Request(prompt, GREEDY)])
    for given in (torch.tensor(prompt), np.array(prompt, np.int32), tuple(prompt), np.array(prompt, np.uint16)):
        request = Request(given, GREEDY)
        assert request.prompt_ids == prompt
        assert engine(model).generate([request])[0][0].completion_ids == as_list[0][0].completion_ids
    assert SamplingParams(stop_token_ids=np.array([3, 4])).stop_token_ids == (3, 4)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)


def test_a_str_stop_string_is_one_string():
    """stop_strings="stop" became ('s', 't', 'o', 'p'): generation stopped at the first s, t, o or p."""
    assert SamplingParams(stop_strings="stop").stop_strings == ("stop",)
    assert SamplingParams(stop_strings=["a", "bc"]).stop_strings == ("a", "bc")


def test_the_lowest_temperature_gives_finite_logprobs(model):
    """Under MIN_TEMPERATURE is refused (above); at it, logits / T stays finite and the
    logprobs are those of softmax(logits / T) the trainer recomputes."""
    prompt = prompts(1, seed=4)[0]
    params = SamplingParams(temperature=MIN_TEMPERATURE, max_new_tokens=6, ignore_eos=True, seed=1)
    (completion,), = engine(model).generate([Request(prompt, params)])
    tokens = prompt + completion.completion_ids
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)),
                       torch.tensor([0, len(tokens)], dtype=torch.int32))
        logits = model.logits(hidden[len(prompt) - 1:-1])
    want = (logits / MIN_TEMPERATURE).log_softmax(-1).gather(-1, torch.tensor(completion.completion_ids)[:, None])
    assert all(math.isfinite(x) and x <= 0 for x in completion.logprobs)
    torch.testing.assert_close(torch.tensor(completion.logprobs), want[:, 0], rtol=0, atol=1e-2)


def test_max_model_len_past_the_models_positions_is_refused(model):
    """max_model_len=1200 on a 512-position model generated past the trained positions."""
    with pytest.raises(ValueError, match=r"EngineConfig\.max_model_len is 1200, past the model's 512 positions"):
        Engine(model, config=EngineConfig(max_model_len=1200, kv_cache_bytes=1 << 20))
    assert Engine(model, config=EngineConfig(max_model_len=512, kv_cache_bytes=1 << 20)).max_len == 512
    with pytest.raises(TypeError, match="Engine's config must be an EngineConfig"):
        Engine(model, config=dict(block_size=4))


def test_the_engine_checks_and_keeps_its_own_config(model):
    """The engine kept the caller's EngineConfig object: a field set on it after it was built
    (block_size=3, not a power of two) reached the block manager unchecked, and a change made
    after the engine was built altered the running engine."""
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20)
    config.block_size = 3
    with pytest.raises(ValueError, match="EngineConfig.block_size must be a power of two, got 3"):
        Engine(model, config=config)
    config.block_size = 4
    eng = Engine(model, config=config)
    config.block_size = 8
    assert eng.config.block_size == 4 and eng.config is not config


def test_top_k_at_its_bound_keeps_every_token(model):
    """top_k >= 2**63 overflowed the sampler's int64 table; the largest k taken keeps everything."""
    prompt = prompts(1, seed=5)[0]
    unfiltered = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True, seed=3)
    most = SamplingParams(**{**unfiltered.__dict__, "top_k": TOP_K_MAX})
    got = engine(model).generate([Request(prompt, unfiltered), Request(prompt, most)])
    assert got[0][0].completion_ids == got[1][0].completion_ids


def test_max_len_after_release_says_what_to_do(model):
    eng = engine(model)
    length = eng.max_len
    eng.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        eng.max_len
    eng.resume_memory()
    assert eng.max_len == length


def test_unseeded_requests_differ_across_fresh_engines_unless_the_engine_is_seeded(model):
    """Engine(seed) defaulted to 0, so every fresh engine (every run of a script) drew the same
    seeds for requests without one and repeated their samples."""
    prompt = prompts(1, seed=6)[0]
    unseeded = [Request(prompt, SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True), n=4)]

    def samples(**seed):
        eng = Engine(model, config=EngineConfig(block_size=4, kv_cache_bytes=1 << 20), **seed)
        return [c.completion_ids for c in eng.generate(unseeded)[0]]

    assert samples() != samples()
    assert samples(seed=7) == samples(seed=7)
    with pytest.raises(TypeError, match="Engine's seed must be an int"):
        Engine(model, config=EngineConfig(kv_cache_bytes=1 << 20), seed="7")
