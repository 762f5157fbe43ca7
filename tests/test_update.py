"""The policy update against a plain torch reference (materialized logits, torch's AdamW and
clipping on the model's own fp32 parameters), micro-batching against one big batch, the
optimizer state's offload round trip, and the memory phases around the engine. On CPU the
kernels run in Triton's interpreter (conftest.py); marked gpu, the same on CUDA."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastazr.kernels import pg_loss_reference
from fastazr.model import Decoder, ModelConfig
from fastazr.rollout import Engine, EngineConfig, Request, SamplingParams
from fastazr.update import (ColocatedMemory, MasterOptimizer, PolicyUpdate, Rollout, Telemetry, UpdateConfig,
                            plan_micro_batches)

# Odd sizes: GQA groups of 3, head_dim 12, a vocabulary that is no multiple of anything; untied
# so the lm_head has its own gradient.
TINY = ModelConfig(architecture="qwen2", vocab_size=301, hidden_size=72, intermediate_size=100, num_layers=2,
                   num_heads=6, num_kv_heads=2, qkv_bias=True, max_position_embeddings=512, eos_token_ids=[7],
                   tie_word_embeddings=False)
# fp32 on both sides: summation order is the only difference
FP32_RTOL, FP32_ATOL = 1e-4, 1e-6


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    return request.param


def tiny_model(device: str, seed: int = 0) -> Decoder:
    model = Decoder(TINY, device=device, dtype=torch.float32)
    model.init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm") and not name.endswith("bias"):
                p.mul_(5.0)  # logits far from uniform, so the loss has real gradients
    return model


def make_rollouts(count: int = 7, seed: int = 0) -> list[Rollout]:
    """Odd lengths; per-sequence and per-token advantages; masks with holes; old logprobs off by
    up to +-0.3 so that some ratios clip."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for i in range(count):
        p, c = (int(x) for x in torch.randint(3, 29, (2,), generator=g))
        completion = torch.randint(0, TINY.vocab_size, (c,), generator=g).tolist()
        advantage = float(torch.randn((), generator=g)) if i % 2 else torch.randn(c, generator=g).tolist()
        old = (torch.rand(c, generator=g) * -4 - 2).tolist()
        mask = (torch.rand(c, generator=g) > 0.2).tolist() if i % 3 == 0 else None
        rollouts.append(Rollout(torch.randint(0, TINY.vocab_size, (p,), generator=g).tolist(), completion,
                                advantage, old, mask))
    return rollouts


def reference_update(model: Decoder, minis: list[list[Rollout]], config: UpdateConfig, recompute: bool = False):
    """The update the plain way: each mini-batch at once, logits materialized in fp32, torch's
    clip_grad_norm_ and AdamW (foreach off) on the model's parameters. Returns each step's (PGLoss,
    {name: gradient before clipping})."""
    device = model.device
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=config.weight_decay),
                                   dict(params=rest, weight_decay=0.0)],
                                  lr=config.lr, betas=config.betas, eps=config.eps, foreach=False)

    def packed(rollouts):
        ids = torch.tensor([t for r in rollouts for t in r.prompt_ids + r.completion_ids], device=device)
        positions = torch.cat([torch.arange(r.num_tokens) for r in rollouts]).to(device)
        cu = torch.tensor([0] + [r.num_tokens for r in rollouts]).cumsum(0)
        rows = torch.cat([torch.arange(int(cu[i]) + len(r.prompt_ids) - 1, int(cu[i]) + r.num_tokens - 1)
                          for i, r in enumerate(rollouts)]).to(device)
        targets = torch.tensor([t for r in rollouts for t in r.completion_ids], device=device)
        return ids, positions, cu.to(torch.int32).to(device), rows, targets

    def logprobs_entropy(rollouts):
        ids, positions, cu, rows, targets = packed(rollouts)
        hidden = model(ids, positions, cu)[rows]
        logp_all = (F.linear(hidden, model.lm_head_weight).float() / config.temperature).log_softmax(-1)
        return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)

    if recompute:
        with torch.no_grad():
            olds = [logprobs_entropy(rollouts)[0] for rollouts in minis]
    else:
        olds = [torch.tensor([x for r in rollouts for x in r.old_logprobs], device=device) for rollouts in minis]
    steps = []
    for rollouts, old in zip(minis, olds):
        adv = torch.tensor([a for r in rollouts for a in (r.advantage if isinstance(r.advantage, list)
                                                           else [r.advantage] * len(r.completion_ids))], device=device)
        mask = torch.tensor([m for r in rollouts for m in (r.loss_mask or [True] * len(r.completion_ids))],
                            device=device)
        model.train()
        logprobs, entropy = logprobs_entropy(rollouts)
        out = pg_loss_reference(logprobs, old, adv, mask, config.clip_low, config.clip_high, entropy,
                                config.entropy_coef)
        out.loss.backward()
        steps.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
    return steps


def capture_grads(update: PolicyUpdate) -> list[dict[str, torch.Tensor]]:
    """Each step's fp32 gradients before clipping, by parameter name."""
    names = {id(p): n for n, p in update.model.named_parameters()}
    seen = []
    step = update.optimizer.step

    def capturing(*args):
        views = update.optimizer._views(update.optimizer.grad)
        seen.append({names[id(p)]: v.clone() for p, v in zip(update.optimizer.params, views)})
        return step(*args)

    update.optimizer.step = capturing
    return seen


# lr large enough that one step moves every weight measurably; eps 1e-4 keeps Adam's first step
# g / (|g| + eps) smooth where a gradient is ~0 (at 1e-8 its sign alone would decide).
CONFIG = dict(lr=1e-3, eps=1e-4, weight_decay=0.1, max_grad_norm=0.05, entropy_coef=0.01, temperature=0.7)


@pytest.mark.parametrize("old_logprobs,policy_loss", [("engine", "fused"), ("recompute", "fused"),
                                                      ("engine", "composable")])
def test_fused_update_equals_plain_torch_reference(device, old_logprobs, policy_loss):
    """Two mini-batches (two optimizer steps: Adam's state and the zeroed gradients carry over),
    each over several micro-batches, against the reference on the same halves; with the loss
    fused into the lm_head and composed of linear_logprobs and pg_loss (the default)."""
    model = tiny_model(device)
    twin = copy.deepcopy(model)
    rollouts = make_rollouts(8)
    config = UpdateConfig(micro_batch_tokens=60, mini_batches=2, old_logprobs=old_logprobs, policy_loss=policy_loss,
                          **CONFIG)
    update = PolicyUpdate(model, config)
    grads = capture_grads(update)
    metrics = update(rollouts)
    steps = reference_update(twin, [rollouts[:4], rollouts[4:]], config, recompute=old_logprobs == "recompute")
    assert metrics["micro_batches"] > 4 and metrics["steps"] == 2
    tokens = [sum(float(r.loss_mask.count(True)) if r.loss_mask else len(r.completion_ids) for r in half)
              for half in (rollouts[:4], rollouts[4:])]
    for key in ("loss", "clip_fraction", "approx_kl", "mean_ratio", "entropy"):
        want = sum(getattr(out, key).item() * n for (out, _), n in zip(steps, tokens)) / sum(tokens)
        assert metrics[key] == pytest.approx(want, rel=FP32_RTOL, abs=FP32_ATOL), key
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in step_grads.values()))) for _, step_grads in steps]
    assert metrics["grad_norm"] == pytest.approx(sum(norms) / 2, rel=FP32_RTOL)
    assert min(norms) > config.max_grad_norm  # clipping took part
    for step, (_, want_grads) in enumerate(steps):
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[step][name], g, rtol=FP32_RTOL, atol=FP32_ATOL, msg=name)
    initial = tiny_model(device)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=FP32_RTOL, atol=1e-6, msg=name)
        assert not torch.equal(p, initial.get_parameter(name)), f"{name} did not move"


def test_one_micro_batch_equals_many(device):
    rollouts = make_rollouts(9, seed=1)
    results = []
    # one bin per mini-batch vs one or two sequences per bin, with activation checkpointing
    # (recomputing each layer in backward must not change a gradient either)
    for budget, checkpointing in ((10**6, False), (45, True)):
        model = tiny_model(device)
        update = PolicyUpdate(model, UpdateConfig(micro_batch_tokens=budget, mini_batches=2,
                                                  activation_checkpointing=checkpointing, **CONFIG))
        grads = capture_grads(update)
        results.append((update(rollouts), grads, model))
    (one, one_grads, one_model), (many, many_grads, many_model) = results
    assert one["micro_batches"] == 2 and many["micro_batches"] > 6 and many["steps"] == 2
    for key in ("loss", "clip_fraction", "approx_kl", "mean_ratio", "entropy", "grad_norm"):
        assert many[key] == pytest.approx(one[key], rel=FP32_RTOL, abs=FP32_ATOL), key
    for step in range(2):
        for name in one_grads[step]:
            torch.testing.assert_close(many_grads[step][name], one_grads[step][name], rtol=FP32_RTOL,
                                       atol=FP32_ATOL, msg=name)
    for p, q in zip(one_model.parameters(), many_model.parameters()):
        torch.testing.assert_close(q, p, rtol=FP32_RTOL, atol=1e-6)


def test_offload_round_trip_keeps_the_optimizer_state_bitwise(device):
    rollouts = make_rollouts(5, seed=2)
    model, twin = tiny_model(device), tiny_model(device)
    update, control = PolicyUpdate(model, UpdateConfig(**CONFIG)), PolicyUpdate(twin, UpdateConfig(**CONFIG))
    update(rollouts)
    control(rollouts)
    optimizer: MasterOptimizer = update.optimizer
    state = optimizer._state_tensors()
    assert len(state) == 5  # the master and two moments of each of the two param groups
    before = [t.clone() for t in state]
    optimizer.offload()
    assert all(t.untyped_storage().nbytes() == 0 for t in state + [optimizer.grad])
    optimizer.onload()
    optimizer.wait_onloaded()
    for t, b in zip(state, before):
        assert torch.equal(t, b)
    assert torch.count_nonzero(optimizer.grad) == 0
    update(rollouts)
    control(rollouts)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_colocated_cycles_generate_train_generate(device):
    model = tiny_model(device)
    # the engine samples at temperature 1, so its logprobs are the trainer's at 1
    update = PolicyUpdate(model, UpdateConfig(optimizer_offload="cpu", **{**CONFIG, "temperature": 1.0}))
    engine = Engine(model, config=EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    telemetry = Telemetry(device)
    memory = ColocatedMemory(engine, update.optimizer, update.config, telemetry)
    assert memory.offload and update.optimizer.offloaded
    pointers = [p.data_ptr() for p in model.parameters()]
    prompts = [r.prompt_ids for r in make_rollouts(4, seed=3)]
    params = SamplingParams(temperature=1.0, max_new_tokens=9, seed=5)
    first = None
    for cycle in range(3):
        with telemetry.phase("generate"):
            groups = engine.generate([Request(p, params, n=2) for p in prompts])
        completions = [c for group in groups for c in group]
        if first is None:
            first = completions
        memory.to_training()
        assert engine.cache is None
        rollouts = [Rollout(c.prompt_ids, c.completion_ids, 1.0 if i % 2 else -1.0, c.logprobs)
                    for i, c in enumerate(completions) if c.completion_ids]
        with telemetry.phase("train"):
            metrics = update(rollouts)
        # on-policy: the engine's logprobs are what the trainer recomputes, so the ratio is 1
        assert metrics["mean_ratio"] == pytest.approx(1.0, abs=1e-3)
        memory.to_generation()
        assert engine.cache is not None and update.optimizer.offloaded
    # the optimizer wrote the weights in place: the engine never held another copy
    assert [p.data_ptr() for p in model.parameters()] == pointers
    timeline = telemetry.timeline()
    for phase in ("generate", "release_kv", "swap_in_issue", "train", "swap_out", "create_kv"):
        assert timeline[f"{phase}/seconds"] > 0
    # the same seeds after three updates: the engine generates with the new weights
    again = [c for group in engine.generate([Request(p, params, n=2) for p in prompts]) for c in group]
    assert [c.completion_ids for c in again] != [c.completion_ids for c in first]
    telemetry.close()


def test_offload_policy_auto_and_forced():
    from fastazr.update.memory import offloads

    optimizer = PolicyUpdate(tiny_model("cpu"), UpdateConfig()).optimizer
    assert optimizer.resident_bytes == 12 * sum(p.numel() for p in optimizer.params)
    assert offloads(optimizer, UpdateConfig(optimizer_offload="cpu"))
    assert not offloads(optimizer, UpdateConfig(optimizer_offload="gpu"))
    assert not offloads(optimizer, UpdateConfig(optimizer_offload="auto"))  # no GPU to make room on


def test_micro_batch_plan_packs_within_the_budget():
    lengths = [5, 17, 3, 40, 9, 9, 12, 1, 30]
    bins = plan_micro_batches(lengths, 32)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [3] in bins  # longer than the budget: alone
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins if b != [3])
    # first-fit decreasing: 40 | 30 + 1 | 17 + 12 + 3 | 9 + 9 + 5
    assert bins == [[3], [7, 8], [1, 2, 6], [0, 4, 5]]


def test_bad_input_names_what_to_change():
    with pytest.raises(ValueError, match="old_logprobs has 2 entries for 3 completion tokens"):
        Rollout([1], [1, 2, 3], 1.0, [0.0, 0.0])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Rollout([], [1], 1.0)
    with pytest.raises(ValueError, match="UpdateConfig.micro_batch_tokens"):
        UpdateConfig(micro_batch_tokens=0)
    with pytest.raises(ValueError, match="UpdateConfig.optimizer_offload"):
        UpdateConfig(optimizer_offload="disk")
    update = PolicyUpdate(tiny_model("cpu"), UpdateConfig())
    with pytest.raises(ValueError, match="old_logprobs='recompute'"):
        update([Rollout([1, 2], [3], 1.0)])
    with pytest.raises(ValueError, match="no rollouts"):
        update([])
    update.optimizer.offload()
    with pytest.raises(RuntimeError, match="to_training"):
        update([Rollout([1, 2], [3], 1.0, [-1.0])])
    update.optimizer.onload()


def test_a_non_finite_gradient_skips_the_step():
    """A NaN advantage on a counted token makes every gradient NaN: the step is skipped, the
    weights and Adam's state stay finite, and the next update trains normally."""
    model = tiny_model("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    update = PolicyUpdate(model, UpdateConfig(**CONFIG))
    rollouts = make_rollouts(3, seed=4)
    poisoned = [Rollout(r.prompt_ids, r.completion_ids, float("nan"), r.old_logprobs) for r in rollouts]
    metrics = update(poisoned)
    assert metrics["skipped_steps"] == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert update(rollouts)["skipped_steps"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
