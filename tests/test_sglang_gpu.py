"""The SGLang backend's real cycle on a GPU (issue 24), what neither the contract test nor the
stand-in can show: generate -> release (NVML: the memory comes back) -> an update step -> resume
weights -> push weights -> resume KV -> generate, with the new generation's logprobs against the
trainer's recomputation under the new weights. Needs CUDA, SGLang 0.5.23 (pip install
"fastazr[sglang]") and the embedded model; skipped otherwise.

Not run yet: SGLang could not be installed where this backend was written (sglang 0.5.23 needs
torch 2.14.1 and its CUDA wheels). The bounds below are set from the embedded engine's split-K
decode path (mean 1.9e-2, max 0.3 against the same recomputation, a kernel rounding
differently from the trainer's), not measured on SGLang: a first run should report its numbers
and tighten them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastazr.rollout import Request, SamplingParams, SGLangBackend, SGLangConfig
from fastazr.update import ColocatedMemory, PolicyUpdate, Rollout, UpdateConfig
from test_rollout_gpu import CHATS, smollm2, trainer_logprobs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                 reason='SGLang is not installed: pip install "fastazr[sglang]"')]


def deltas(groups, model) -> torch.Tensor:
    """|SGLang's logprob - the trainer's recomputation| of every completion token."""
    found = []
    for group in groups:
        for c in group:
            ours = trainer_logprobs(model, c.prompt_ids, c.completion_ids)
            found.append((ours - torch.tensor(c.logprobs, device=ours.device)).abs())
    return torch.cat(found)


def test_the_colocated_cycle_generates_on_the_pushed_weights():
    model, tokenizer = smollm2()
    update = PolicyUpdate(model, UpdateConfig(lr=1e-3))
    backend = SGLangBackend(model, tokenizer, SGLangConfig(mem_fraction_static=0.5), seed=0)
    try:
        memory = ColocatedMemory(backend, update.optimizer, update.config)  # starts SGLang, pushes the weights
        params = SamplingParams(temperature=1.0, max_new_tokens=64, ignore_eos=True, seed=3)
        requests = [Request(tokenizer.encode_chat([{"role": "user", "content": c}]), params, n=2) for c in CHATS]
        first = backend.generate(requests)
        before = deltas(first, model)

        used = torch.cuda.device_memory_used()
        backend.release_memory()  # raises itself if SGLang kept more than --sglang.max-residual-gib
        freed = used - torch.cuda.device_memory_used()
        held, residual = backend.stats["held_bytes"], backend.stats["residual_bytes"]
        print(f"release: SGLang held {held / 2**30:.2f} GiB, kept {residual / 2**30:.2f}; NVML freed "
              f"{freed / 2**30:.2f} GiB")
        assert freed >= 0.9 * backend.stats["released_bytes"] and freed >= 0.5 * held

        memory.to_training()
        old = [p.detach().clone() for p in model.parameters()]
        rollouts = [Rollout(c.prompt_ids, c.completion_ids, 1.0 if i % 2 else -1.0, c.logprobs)
                    for i, c in enumerate(c for group in first for c in group)]
        update(rollouts)
        moved = max((p.detach() - o).abs().max().item() for p, o in zip(model.parameters(), old))
        assert moved > 0, "the update did not change the weights"
        memory.to_generation()  # resume weights, push, resume the KV cache and graphs
        print(f"push: {backend.stats['push_bytes'] / 1e9:.2f} GB in {backend.stats['buckets']} buckets, "
              f"{backend.stats['push_seconds']:.3f} s")

        second = backend.generate(requests)
        after = deltas(second, model)
        current = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, o in zip(model.parameters(), old):
                p.copy_(o)
            stale = deltas(second, model)  # the same tokens scored by the weights before the update
            for p, c in zip(model.parameters(), current):
                p.copy_(c)
        print(f"SGLang vs trainer logprobs: before the update mean |d| {before.mean():.2e} max {before.max():.2e}; "
              f"after it, new weights: mean {after.mean():.2e} max {after.max():.2e}; old weights: mean "
              f"{stale.mean():.2e} over {after.numel()} tokens")
        assert before.mean() <= 5e-2 and before.max() <= 1.0
        assert after.mean() <= 5e-2 and after.max() <= 1.0
        assert stale.mean() > 2 * after.mean(), "the new generation matches the old weights: no push arrived"
    finally:
        backend.close()
