"""The SGLang backend's own logic against a recording stand-in of sglang.Engine and of the GPU
(issue 24): the phase order of a training step, the weight push (HF names, buckets, flush with the
last, buckets alive and unchanged until acknowledged), the request and result mapping onto the
embedded engine's Completions, and every error. The stand-in asserts what SGLang 0.5.23 asserts
(tags released before resumed, pushes inside begin/end_weight_update) and that it generates on
the trainer's current weights. tests/test_sglang_contract.py checks the names used against
SGLang's source; tests/test_sglang_gpu.py runs the real thing."""

from __future__ import annotations

import dataclasses
import random
import re
import sys

import pytest
import torch

from fastazr.model import Decoder, ModelConfig
from fastazr.model.weights import hf_layout
from fastazr.options import TrainConfig, parse_args
from fastazr.rollout import Completion, Request, SamplingParams, SGLangBackend, SGLangConfig
from fastazr.rollout.sglang_backend import CUDA_GRAPH, KV_CACHE, WEIGHTS
from fastazr.rollout.sglang_requests import finish_completion, sample_seed
from fastazr.rollout.sglang_runtime import INSTALL_HINT, SGLangRuntime, start_engine
from fastazr.rollout.sglang_weights import ALIGN, plan_buckets
from fastazr.update import ColocatedMemory, PolicyUpdate, Rollout, UpdateConfig

TINY = ModelConfig(architecture="qwen2", vocab_size=301, hidden_size=72, intermediate_size=100, num_layers=2,
                   num_heads=6, num_kv_heads=2, qkv_bias=True, max_position_embeddings=64, eos_token_ids=[7])
GIB = 2**30
ALL = {KV_CACHE, WEIGHTS, CUDA_GRAPH}


class FakeGPU:
    """Bytes NVML would count: the trainer's torch cache, what was there before SGLang, and
    SGLang's allocations per memory-saver tag (plus what it keeps when released)."""

    def __init__(self):
        self.total, self.other, self.trainer = 80 * GIB, 1 * GIB, 10 * GIB
        self.sizes = {WEIGHTS: 3 * GIB, KV_CACHE: 40 * GIB, CUDA_GRAPH: 1 * GIB}
        self.context, self.leak = GIB // 2, 0
        self.started = False
        self.resident: set[str] = set()

    def used(self) -> int:
        sglang = self.context + self.leak + sum(self.sizes[t] for t in self.resident) if self.started else 0
        return self.other + self.trainer + sglang


class FakeEngine:
    """sglang.Engine's methods the backend calls, recording each and asserting SGLang's rules."""

    def __init__(self, log: list, gpu: FakeGPU, server_args: dict, model: Decoder):
        self.log, self.gpu, self.server_args, self.model = log, gpu, server_args, model
        gpu.started, gpu.resident = True, set(ALL)
        self.weights: dict[str, torch.Tensor] = {}  # load_format="dummy": nothing the trainer's yet
        self.session = False
        self.received: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fail_update = None
        self.script = None
        """outputs(input_ids, sampling_params) -> list of output dicts; None: random completions."""

    def release_memory_occupation(self, tags=None):
        self.log.append(("release", tuple(tags)))
        assert set(tags) <= self.gpu.resident, f"releasing {tags}, resident {self.gpu.resident}"
        self.gpu.resident -= set(tags)
        if WEIGHTS in tags:
            self.weights = {}  # no CPU backup: released weights come back as garbage

    def resume_memory_occupation(self, tags=None):
        self.log.append(("resume", tuple(tags)))
        assert not set(tags) & self.gpu.resident, f"resuming {tags}, resident {self.gpu.resident}"  # KeyError in SGLang
        self.gpu.resident |= set(tags)

    def begin_weight_update(self):
        self.log.append(("begin",))
        assert not self.session and WEIGHTS in self.gpu.resident
        self.session = True
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        assert self.session, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        assert load_format == "flattened_bucket" and len(named_tensors) == self.server_args["tp_size"]
        kind, flat, metadata = named_tensors[0]
        assert kind == "bucket" and flat.dtype == torch.uint8
        for name, shape, dtype, start, end in metadata:
            assert start % ALIGN == 0
            self.weights[name] = flat[start:end].view(dtype).view(shape).clone()
        self.received.append((flat, flat.clone()))
        self.log.append(("update", flush_cache, tuple(m[0] for m in metadata)))
        if self.fail_update:
            return False, self.fail_update
        return True, "Success"

    def end_weight_update(self):
        self.log.append(("end",))
        assert self.session
        for flat, snapshot in self.received:  # what CUDA IPC would still read until acknowledged
            assert torch.equal(flat, snapshot), "a bucket changed after it was sent"
        self.received.clear()
        self.session = False
        return True, "Success"

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        self.log.append(("generate", len(input_ids)))
        assert return_logprob and self.gpu.resident == ALL and not self.session
        current = {name: slot.view(self.model).detach() for name, slot in hf_layout(self.model.config).items()}
        assert self.weights.keys() == current.keys(), "generating on weights the trainer never pushed"
        for name, tensor in current.items():
            assert torch.equal(self.weights[name], tensor), f"{name} is not the trainer's current weight"
        return (self.script or random_outputs)(input_ids, sampling_params)

    def shutdown(self):
        self.log.append(("shutdown",))


def random_outputs(input_ids, sampling_params, vocab=TINY.vocab_size):
    outputs = []
    for ids, sp in zip(input_ids, sampling_params):
        rng = random.Random(sp["sampling_seed"])
        tokens, finish = [], {"type": "length", "length": sp["max_new_tokens"]}
        while len(tokens) < sp["max_new_tokens"]:
            tokens.append(rng.randrange(vocab))
            if not sp["ignore_eos"] and tokens[-1] in sp["stop_token_ids"]:
                finish = {"type": "stop", "matched": tokens[-1]}
                break
        outputs.append(output(tokens, finish))
    return outputs


def output(tokens, finish, logprobs=None):
    logprobs = logprobs or [-0.5 - 0.01 * k for k in range(len(tokens))]
    return {"output_ids": list(tokens),
            "meta_info": {"id": "r", "finish_reason": finish, "prompt_tokens": 3,
                          "output_token_logprobs": [(lp, t, None) for lp, t in zip(logprobs, tokens)]}}


class FakeRuntime:
    def __init__(self, model: Decoder, log: list):
        self.model, self.log, self.gpu, self.gpu_id = model, log, FakeGPU(), 0
        self.engine: FakeEngine | None = None

    def start(self, server_args):
        self.log.append(("start",))
        self.engine = FakeEngine(self.log, self.gpu, server_args, self.model)
        return self.engine

    def bucket_payload(self, flat, entries, tp_size):
        metadata = [(e.name, tuple(e.tensor.shape), e.tensor.dtype, e.start, e.end) for e in entries]
        return [("bucket", flat, metadata)] * tp_size

    def staging(self, nbytes):
        self.log.append(("staging", nbytes))
        return torch.empty(nbytes, dtype=torch.uint8)

    def synchronize(self):
        self.log.append(("synchronize",))

    def empty_cache(self):
        self.log.append(("empty_cache",))

    def used_bytes(self):
        return self.gpu.used()

    def reserved_bytes(self):
        return self.gpu.trainer

    def free_bytes(self):
        return self.gpu.total - self.gpu.used()


def tiny_model(seed: int = 0) -> Decoder:
    model = Decoder(TINY, device="cpu", dtype=torch.float32)
    model.init_weights(seed)
    return model


def backend(bucket_bytes=20_000, tokenizer=None, seed=0, **config) -> tuple[SGLangBackend, list, FakeRuntime]:
    model, log = tiny_model(), []
    runtime = FakeRuntime(model, log)
    b = SGLangBackend(model, tokenizer, SGLangConfig(bucket_bytes=bucket_bytes, **config), seed=seed, runtime=runtime)
    return b, log, runtime


def pushes(log: list) -> list[tuple]:
    """The log with each push's staging/synchronize/update steps folded into ('push', flushes)."""
    folded, flushes = [], []
    for event in log:
        if event[0] in ("staging", "synchronize"):
            continue
        if event[0] == "update":
            flushes.append(event[1])
        elif event[0] == "end":
            folded.append(("push", tuple(flushes)))
            flushes = []
        elif event[0] != "begin":
            folded.append(event)
    return folded


def test_a_training_step_runs_the_phases_in_order():
    """Through the trainer's own ColocatedMemory and a real update: start at the first resume
    (the optimizer state already off the GPU), push; then release everything; train; empty the
    trainer's cache, resume weights, push the new weights (flush with the last bucket), empty the
    cache again, resume the KV cache and graphs; generate on the new weights."""
    b, log, runtime = backend()
    update = PolicyUpdate(b.model, UpdateConfig(lr=1e-2))
    memory = ColocatedMemory(b, update.optimizer, update.config)
    n = len(plan_buckets(b.model, b.config.bucket_bytes))
    assert n >= 3  # several buckets, so "flush only with the last" is tested
    flushes = (False,) * (n - 1) + (True,)
    assert pushes(log) == [("empty_cache",), ("start",), ("push", flushes)]
    assert b.state == "ready"

    log.clear()
    memory.to_training()
    assert pushes(log) == [("release", (KV_CACHE, WEIGHTS, CUDA_GRAPH))]
    before = b.model.embed_tokens.detach().clone()
    update([Rollout([1, 2, 3], [4, 5, 6], 1.0, [-5.0, -5.0, -5.0])])
    assert not torch.equal(before, b.model.embed_tokens), "the update did not change the weights"
    memory.to_generation()
    assert pushes(log)[1:] == [("empty_cache",), ("resume", (WEIGHTS,)), ("push", flushes), ("empty_cache",),
                               ("resume", (KV_CACHE, CUDA_GRAPH))]
    # every bucket: a fresh staging block, filled, synchronized, then sent
    steps = [e[0] for e in log if e[0] in ("staging", "synchronize", "update")]
    assert steps == ["staging", "synchronize", "update"] * n

    log.clear()
    out = b.generate([Request([1, 2, 3], SamplingParams(max_new_tokens=5))])  # the stand-in checks the weights
    assert pushes(log) == [("generate", 1)] and len(out[0][0].completion_ids) >= 1
    b.close()
    assert log[-1] == ("shutdown",)


def test_the_push_sends_every_hf_tensor_once_in_buckets():
    b, log, runtime = backend(bucket_bytes=30_000)
    b.resume_memory()
    b.weights_updated()
    sent = [name for e in log if e[0] == "update" for name in e[2]]
    assert sent == list(hf_layout(TINY))  # save_hf's names, checkpoint order, each once
    assert "model.layers.0.self_attn.q_proj.bias" in sent and "lm_head.weight" in sent
    for bucket in plan_buckets(b.model, 30_000):
        if len(bucket.entries) > 1:
            assert bucket.nbytes <= 30_000
        ends = [e.start for e in bucket.entries[1:]] + [bucket.nbytes]
        assert all(e.start % ALIGN == 0 and e.end <= nxt for e, nxt in zip(bucket.entries, ends))
    q, k, v = (runtime.engine.weights[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), b.model.layers[1].attn.qkv_weight.detach())
    assert b.stats["buckets"] == len(plan_buckets(b.model, 30_000))
    assert b.stats["push_bytes"] >= sum(p.numel() * 4 for p in b.model.parameters())


def test_a_tensor_larger_than_a_bucket_gets_its_own():
    buckets = plan_buckets(tiny_model(), 100)
    assert all(len(bucket.entries) == 1 for bucket in buckets)
    assert len(buckets) == len(hf_layout(TINY))


def test_weights_updated_while_resident_pushes_with_the_kv_cache_in_place():
    """A checkpoint loaded between steps: the push goes into the running engine, no release."""
    b, log, runtime = backend()
    b.generate([Request([1, 2])])  # starts SGLang and pushes on first use
    with torch.no_grad():
        b.model.norm.add_(1.0)
    log.clear()
    b.weights_updated()
    assert [e[0] for e in pushes(log)] == ["push"]
    b.generate([Request([1, 2])])  # the stand-in asserts the new norm arrived


def test_generate_after_resume_pushes_when_weights_updated_was_not_called():
    """Released weights come back as garbage: a resume alone must not generate on them."""
    b, log, runtime = backend()
    b.generate([Request([1, 2])])
    b.release_memory()
    b.resume_memory()
    log.clear()
    b.generate([Request([1, 2])])
    assert pushes(log) == [("push", pushes_of(b)), ("empty_cache",), ("resume", (KV_CACHE, CUDA_GRAPH)),
                           ("generate", 1)]


def pushes_of(b: SGLangBackend) -> tuple:
    n = len(plan_buckets(b.model, b.config.bucket_bytes))
    return (False,) * (n - 1) + (True,)


def test_release_and_resume_are_idempotent_and_match_tags():
    b, log, runtime = backend()
    b.release_memory()  # before SGLang started: nothing to give back
    assert log == []
    b.resume_memory()
    b.resume_memory()
    assert [e[0] for e in log].count("start") == 1
    b.release_memory()
    b.release_memory()
    b.resume_memory()
    b.release_memory()  # weights resumed, KV cache still out: only the weights go back
    assert pushes(log)[-1] == ("release", (WEIGHTS,))
    assert runtime.gpu.resident == set()


def test_server_args():
    b, log, runtime = backend(tp_size=2, mem_fraction_static=0.7, seed=11)
    b.resume_memory()
    args = runtime.engine.server_args
    assert args["enable_memory_saver"] and args["skip_tokenizer_init"] and args["load_format"] == "dummy"
    assert args["mem_fraction_static"] == 0.7 and args["tp_size"] == 2 and args["base_gpu_id"] == 0
    assert args["random_seed"] == 11 and args["context_length"] == TINY.max_position_embeddings
    assert args["dtype"] == "float32" and args["enable_fp32_lm_head"] and not args["enable_deterministic_inference"]
    config = (runtime.engine.server_args["model_path"] + "/config.json")
    assert '"architectures"' in open(config).read()
    b.close()
    with pytest.raises(FileNotFoundError):
        open(config)


def test_requests_map_to_sglang_inputs():
    b, log, runtime = backend(context_length=40)
    seen = {}

    def script(input_ids, sampling_params):
        seen.update(ids=input_ids, params=sampling_params)
        return [output([9], {"type": "length", "length": 1}) for _ in input_ids]

    b.resume_memory()
    runtime.engine.script = script
    requests = [Request([1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=50,
                                                   stop_token_ids=(5,), seed=123), n=3),
                Request(list(range(40))),  # fills the context: not sent
                Request([4], SamplingParams(temperature=0, top_k=4, ignore_eos=True, stop_token_ids=(5,)))]
    out = b.generate(requests)
    assert seen["ids"] == [[1, 2, 3]] * 3 + [[4]]
    first = seen["params"][0]
    assert first == dict(temperature=0.7, top_p=0.9, top_k=-1, max_new_tokens=37, stop_token_ids=[5, 7],
                         ignore_eos=False, sampling_seed=sample_seed(123, 0))
    assert [p["sampling_seed"] for p in seen["params"][:3]] == [sample_seed(123, j) for j in range(3)]
    assert len({p["sampling_seed"] for p in seen["params"]}) == 4
    last = seen["params"][3]
    assert last["stop_token_ids"] == [] and last["ignore_eos"] and last["top_k"] == 4 and last["temperature"] == 0
    assert [len(group) for group in out] == [3, 1, 1]
    assert out[1] == [Completion(list(range(40)), [], [], "prompt_too_long")]
    assert out[0][0] == Completion([1, 2, 3], [9], [-0.5], "length")


def test_seed_state_round_trips_the_seeds_of_unseeded_requests():
    b, log, runtime = backend()
    seeds = []
    b.resume_memory()
    runtime.engine.script = lambda ids, params: (seeds.append([p["sampling_seed"] for p in params])
                                                 or [output([9], {"type": "length"}) for _ in ids])
    state = b.seed_state()
    b.generate([Request([1]), Request([2], n=2)])
    b.set_seed_state(state)
    b.generate([Request([1]), Request([2], n=2)])
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 3
    other, _, _ = backend(seed=1)
    assert other.seed_state() != state


EOS = {7}


def finish(tokens, reason, params=SamplingParams(), tokenizer=None, logprobs=None):
    return finish_completion(Request([1], params), output(tokens, reason, logprobs), EOS, tokenizer)


class CharTokenizer:
    """Token t decodes to chr(ord('a') + t % 26); 26 decodes to '</'."""

    def decode(self, ids):
        return "".join("</" if t == 26 else chr(ord("a") + t % 26) for t in ids)


def test_finish_reasons_match_the_embedded_engine():
    stop = {"type": "stop", "matched": 7}
    assert finish([3, 7], stop).finish_reason == "eos"
    params = SamplingParams(stop_token_ids=(4,))
    assert finish([3, 4], {"type": "stop", "matched": 4}, params).finish_reason == "stop_token"
    assert finish([3, 4], {"type": "length", "length": 2}).finish_reason == "length"
    c = finish([3, 7], stop, logprobs=[-1.0, -2.0])
    assert (c.completion_ids, c.logprobs) == ([3, 7], [-1.0, -2.0])  # the stop token is kept, as the engine does
    # ignore_eos: SGLang ran past every stop id; the completion ends at the first one
    c = finish([3, 7, 4, 4, 9], {"type": "length"}, SamplingParams(ignore_eos=True, stop_token_ids=(4,)))
    assert (c.completion_ids, c.finish_reason, len(c.logprobs)) == ([3, 7, 4], "stop_token", 3)
    # stop strings, which SGLang never saw: cut at the first token whose text completes one
    text = SamplingParams(stop_strings=("</",))
    c = finish([0, 1, 26, 2, 7], stop, text, CharTokenizer())
    assert (c.completion_ids, c.finish_reason, len(c.logprobs)) == ([0, 1, 26], "stop_string", 3)
    # the token stop wins a tie, as the engine checks it first; a stop string at the length limit wins
    assert finish([0, 7], stop, SamplingParams(stop_strings=("ah",)), CharTokenizer()).finish_reason == "eos"
    assert finish([0, 1], {"type": "length"}, SamplingParams(stop_strings=("ab",)),
                  CharTokenizer()).finish_reason == "stop_string"
    assert finish([0, 1, 2], {"type": "length"}, text, CharTokenizer()).finish_reason == "length"


@pytest.mark.parametrize("tokens, reason, logprobs, message", [
    ([3, 4], {"type": "abort", "message": "too long"}, None, "an abort"),
    ([3, 4], {"type": "stop", "matched": "NaN happened"}, None, "non-finite logits"),
    ([3, 4], None, None, "ended a request with None"),
    ([3, 4], {"type": "stop", "matched": 7}, None, "does not end its completion"),
])
def test_outputs_the_backend_cannot_map_are_errors(tokens, reason, logprobs, message):
    with pytest.raises(RuntimeError, match=message):
        finish(tokens, reason, logprobs=logprobs)


def test_logprobs_that_do_not_match_the_tokens_are_an_error():
    bad = output([3, 4], {"type": "length"})
    bad["meta_info"]["output_token_logprobs"][1] = (-1.0, 5, None)
    with pytest.raises(RuntimeError, match="do not match"):
        finish_completion(Request([1]), bad, EOS, None)


def test_errors_name_what_to_change(monkeypatch):
    b, log, runtime = backend()
    with pytest.raises(TypeError, match="takes a list of Requests"):
        b.generate(Request([1]))
    with pytest.raises(ValueError, match=r"requests\[0\].prompt_ids\[0\] is 301"):
        b.generate([Request([301])])
    with pytest.raises(ValueError, match="stop_strings needs a tokenizer"):
        b.generate([Request([1], SamplingParams(stop_strings=("x",)))])
    with pytest.raises(TypeError, match="progress must be a callable"):
        b.generate([Request([1])], progress=3)
    counted = []
    b.generate([Request([1], SamplingParams(max_new_tokens=4))], progress=counted.append)
    assert len(counted) == 1 and 1 <= counted[0] <= 4
    b.release_memory()
    with pytest.raises(RuntimeError, match=r"call resume_memory\(\) first"):
        b.generate([Request([1])])

    # the memory checks: SGLang kept too much, or the trainer grew past what SGLang gives back
    b.resume_memory()
    b.weights_updated()
    runtime.gpu.leak = 3 * GIB
    with pytest.raises(RuntimeError, match=r"still holds 3\.50 GiB.*--sglang.max-residual-gib"):
        b.release_memory()
    assert b.stats["residual_bytes"] == 3.5 * GIB
    runtime.gpu.leak = 0
    b, log, runtime = backend()
    b.resume_memory()
    b.weights_updated()
    b.release_memory()
    assert b.stats["released_bytes"] == 44 * GIB and b.stats["residual_bytes"] == GIB // 2
    runtime.gpu.trainer = 70 * GIB
    with pytest.raises(RuntimeError, match=r"needs 44\.00 GiB back.*--sglang.mem-fraction-static"):
        b.resume_memory()
    runtime.gpu.trainer = 10 * GIB
    b.resume_memory()
    runtime.engine.fail_update = "Failed to update parameter online: shape mismatch"
    with pytest.raises(RuntimeError, match="update_weights_from_tensor failed: Failed to update parameter online"):
        b.weights_updated()


@pytest.mark.parametrize("kwargs, message", [
    (dict(mem_fraction_static=1.0), r"--sglang.mem-fraction-static must be in \(0, 1\)"),
    (dict(bucket_bytes=0), "--sglang.bucket-bytes must be >= 1"),
    (dict(tp_size=0), "--sglang.tp-size must be >= 1"),
    (dict(context_length=1), "--sglang.context-length must be >= 2"),
    (dict(max_residual_gib=-1), "--sglang.max-residual-gib must be >= 0"),
    (dict(deterministic="yes"), "--sglang.deterministic must be True or False"),
])
def test_config_checks_name_the_option(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        SGLangConfig(**kwargs)


def test_constructor_checks():
    model = tiny_model()
    with pytest.raises(ValueError, match="--sglang.context-length is 65, past the model's 64 positions"):
        SGLangBackend(model, config=SGLangConfig(context_length=65), runtime=FakeRuntime(model, []))
    with pytest.raises(TypeError, match="must be an SGLangConfig"):
        SGLangBackend(model, config=UpdateConfig(), runtime=FakeRuntime(model, []))
    with pytest.raises(ValueError, match="runs on a CUDA GPU.*--device cuda"):
        SGLangRuntime(torch.device("cpu"))


def test_starting_without_sglang_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang fails, installed or not
    with pytest.raises(ImportError, match=f"needs SGLang 0.5.23.*{re.escape(INSTALL_HINT)}"):
        start_engine({})
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    with pytest.raises(RuntimeError, match="before the temperature"):
        start_engine({})


def test_the_train_options():
    config = parse_args(["--rollout", "sglang", "--sglang.bucket-bytes", "1048576", "--sglang.tp-size", "2"],
                        cuda_available=True)
    assert config.rollout == "sglang" and config.sglang.bucket_bytes == 2**20 and config.sglang.tp_size == 2
    assert parse_args([], cuda_available=True).rollout == "embedded"
    with pytest.raises(ValueError, match="--rollout must be one of"):
        TrainConfig(rollout="vllm")
    with pytest.raises(ValueError, match="--rollout sglang runs on a CUDA GPU"):
        TrainConfig(rollout="sglang", device="cpu")


def test_the_trainer_runs_steps_through_the_sglang_backend(tmp_path, monkeypatch):
    """`python -m fastazr.train --rollout sglang`'s build and loop, the stand-in in SGLang's place:
    two steps (each generate on the weights of the update before it, which the stand-in checks),
    a checkpoint (the backend's seed stream in it), the engine shut down at the end; then the run
    resumed from its checkpoint for a third step."""
    import fastazr.train as train
    from fastazr.azr.config import AZRConfig

    vocab = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1, max_position_embeddings=512, eos_token_ids=[2])
    built = {}

    def load(source, device="cpu", seed=0, **_):
        model = Decoder(vocab, device="cpu", dtype=torch.float32)
        model.init_weights(seed)
        return model, None  # the embedded model's tokenizer is borrowed (train.text_tokenizer)

    def sglang_backend(model, tokenizer, config, seed):
        built["log"] = log = []
        built["backend"] = b = SGLangBackend(model, tokenizer, config, seed=seed, runtime=FakeRuntime(model, log))
        return b

    monkeypatch.setattr(train, "load", load)
    monkeypatch.setattr(train, "SGLangBackend", sglang_backend)
    monkeypatch.setattr(sys.modules[__name__], "TINY", vocab)  # random_outputs draws ids from this vocabulary
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the update's torch paths: the interpreter takes minutes here
    config = TrainConfig(rollout="sglang", device="auto", steps=2, out=str(tmp_path / "run"),
                         azr=AZRConfig(batch_size=1, references=1, induction_inputs=2, induction_min_pairs=2,
                                       learnability_rollouts=2, propose_max_tokens=12, solve_max_tokens=8),
                         sglang=SGLangConfig(bucket_bytes=2**20))
    train.run(config)
    log = built["log"]
    assert sum(e == ("start",) for e in log) == 1 and log[-1] == ("shutdown",)
    assert sum(e[0] == "generate" for e in log) == 4
    assert sum(e == ("release", (KV_CACHE, WEIGHTS, CUDA_GRAPH)) for e in log) == 2
    assert sum(e[0] == "end" for e in log) == 3  # the first push, then one per update
    (state,) = (tmp_path / "run" / "checkpoints").glob("step_*/state.json")
    assert "engine_seeds" in state.read_text()

    # resumed: the checkpoint's weights are pushed into the fresh engine before step 3 generates
    train.run(dataclasses.replace(config, steps=3, resume=config.out))
    log = built["log"]
    assert sum(e[0] == "generate" for e in log) == 2 and log[-1] == ("shutdown",)
