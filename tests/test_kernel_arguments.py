"""The rollout engine's launches keep one Triton specialization: every tensor an eager step or a
decode round hands a kernel starts on a 16-byte boundary, whatever the step's token, sequence and
sampling-row counts (runner.aligned_offsets, Engine._sampling_batch)."""
from __future__ import annotations

import pytest
import torch

from fastazr.kernels import attention_math, decode_advance, layer_fusions, paged_attention
from fastazr.rollout import Request, SamplingParams
from fastazr.rollout.engine import _ParamTable
from fastazr.rollout.sequence import Sequence
from test_rollout import TINY, engine, naive_greedy, tiny_model


class _AlignmentRecorder:
    """Stands in for a Triton kernel: records, launch by launch, each tensor argument's address
    modulo 16, then launches the kernel."""

    def __init__(self, kernel, seen: list[tuple[str, int]], name: str):
        self.kernel, self.seen, self.name = kernel, seen, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.extend((self.name, a.data_ptr() % 16) for a in args if isinstance(a, torch.Tensor))
            return launch(*args, **kwargs)
        return run


@pytest.mark.parametrize("exact", [True, False])
def test_every_kernel_argument_of_a_step_starts_on_16_bytes(monkeypatch, exact):
    """Triton compiles a kernel once per pattern of which pointer arguments are 16-byte aligned,
    so metadata views whose offsets follow a step's token and sequence counts made a step with a
    new pattern wait for a compile (runner.aligned_offsets). The runner's CUDA path on CPU under
    the interpreter, steps mixing decodes with prefill chunks of odd sizes (a budget of 61
    tokens, prompts of 23-70), in exact mode (decodes through the prefill kernel, split and
    folded) and inexact mode (the split-K decode kernel and its merge): every tensor each
    attention, rotary and decode-advance kernel gets starts on a 16-byte boundary, and the
    tokens are still the naive recompute's."""
    seen: list[tuple[str, int]] = []
    for module, name in ((paged_attention, "_prefill_kernel"), (paged_attention, "_fold_kernel"),
                         (paged_attention, "_decode_kernel"), (paged_attention, "_merge_kernel"),
                         (layer_fusions, "_rope_to_cache_kernel"), (decode_advance, "_advance_kernel")):
        monkeypatch.setattr(module, name, _AlignmentRecorder(getattr(module, name), seen, name))
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    model = tiny_model()
    eng = engine(model, cuda_graphs=False, decode_steps=3, max_num_batched_tokens=61, exact_logprobs=exact)
    eng.runner.kernels, eng.runner.num_sms = True, 132
    params = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    g = torch.Generator().manual_seed(9)
    batch = [torch.randint(8, TINY.vocab_size, (n,), generator=g).tolist() for n in (23, 37, 70, 45, 29)]
    results = eng.generate([Request(p, params) for p in batch])
    for prompt, (completion,) in zip(batch, results):
        assert completion.completion_ids == naive_greedy(model, prompt, params.max_new_tokens)[0]
    attention = {"_fold_kernel"} if exact else {"_decode_kernel", "_merge_kernel"}
    launched = {name for name, _ in seen}
    assert launched == {"_prefill_kernel", "_rope_to_cache_kernel", "_advance_kernel"} | attention, launched
    misaligned = sorted({(name, offset) for name, offset in seen if offset})
    assert not misaligned, f"kernel arguments off a 16-byte boundary (kernel, address % 16): {misaligned}"


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 9])
def test_sampling_parameters_start_on_16_bytes_whatever_the_row_count(rows):
    """The sampling parameters come in rows of one upload, of which the sampler kernels read the
    temperature, seed, sample index and step: each row starts on a 16-byte boundary at every row
    count (a decode round's count changes as sequences finish) and holds the rows' own values."""
    eng = engine(tiny_model())
    seqs = [Sequence(tokens=[1] * (3 + i), num_prompt=2, seed=10 + i, sample=i,
                     params=SamplingParams(temperature=0.5 + i, top_p=0.5 + 0.05 * i, top_k=i))
            for i in range(rows + 2)]
    table = _ParamTable(seqs)
    picked = seqs[2:] if rows % 2 else seqs[:rows]
    batch = eng._sampling_batch(picked, table)
    tensors = dict(temperature=batch.temperature, top_p=batch.top_p, top_k=batch.top_k, seeds=batch.seeds,
                   samples=batch.samples, steps=batch.steps)
    assert {name: t.data_ptr() % 16 for name, t in tensors.items()} == dict.fromkeys(tensors, 0)
    assert batch.temperature.tolist() == [s.params.temperature for s in picked]
    assert batch.top_p.tolist() == torch.tensor([s.params.top_p for s in picked], dtype=torch.float32).tolist()
    assert batch.top_k.tolist() == [s.params.top_k for s in picked]
    assert batch.seeds.tolist() == [s.seed for s in picked]
    assert batch.samples.tolist() == [s.sample for s in picked]
    assert batch.steps.tolist() == [len(s.tokens) - s.num_prompt for s in picked]
    assert all(t.shape == (rows,) and t.is_contiguous() for t in tensors.values())
