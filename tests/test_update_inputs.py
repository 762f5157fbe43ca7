"""The policy update at its edges (issue 20, part 3): settings and rollouts checked where they
enter, weights loaded into the model behind the optimizer's back, saving and resuming the
optimizer bitwise, mini-batches without a loss token, NaN and inf on counted tokens through both
loss paths (Triton, in the interpreter on CPU, and the torch reference; the loss itself in
test_pg_loss.py), the learning rate
changed or scheduled between updates, and metrics that were not computed. Tiny models and
short rollouts: every update here takes well under a second."""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from fastazr.kernels import pg_loss_reference
from fastazr.model import Decoder
from fastazr.update import PolicyUpdate, Rollout, UpdateConfig
from fastazr.update import policy_update as policy_update_module
from test_update import CONFIG, TINY, tiny_model

NAN, INF = float("nan"), float("inf")


def short_rollouts(count: int = 3, seed: int = 0) -> list[Rollout]:
    """Short sequences with per-token and per-sequence advantages and old logprobs near the tiny
    model's, so that the update has real gradients."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for i in range(count):
        p, c = (int(x) for x in torch.randint(2, 9, (2,), generator=g))
        advantage = float(torch.randn((), generator=g)) if i % 2 else torch.randn(c, generator=g).tolist()
        rollouts.append(Rollout(torch.randint(0, TINY.vocab_size, (p,), generator=g).tolist(),
                                torch.randint(0, TINY.vocab_size, (c,), generator=g).tolist(), advantage,
                                (torch.rand(c, generator=g) * -4 - 2).tolist()))
    return rollouts


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def adam_steps(update: PolicyUpdate) -> list[float]:
    return [float(state["step"]) for state in update.optimizer.optimizer.state.values()]


@pytest.fixture(params=["triton", "torch"])
def loss_path(request, monkeypatch) -> str:
    """The update with its loss from the Triton kernel or from the torch reference."""
    if request.param == "torch":
        monkeypatch.setattr(policy_update_module, "pg_loss", pg_loss_reference)
    return request.param


# settings


@pytest.mark.parametrize("change,error", [
    # the inputs
    (dict(weight_decay=NAN), ValueError), (dict(weight_decay=INF), ValueError), (dict(lr=INF), ValueError),
    (dict(micro_batch_tokens=NAN), TypeError), (dict(temperature=INF), ValueError),
    (dict(mini_batches=2.5), TypeError), (dict(lr="1e-6"), TypeError), (dict(activation_checkpointing="no"), TypeError),
    # the same classes on the other fields
    (dict(lr=NAN), ValueError), (dict(lr=0.0), ValueError), (dict(eps=NAN), ValueError), (dict(eps=0.0), ValueError),
    (dict(betas=(0.9, NAN)), ValueError), (dict(betas=(0.9,)), ValueError), (dict(betas="ab"), ValueError),
    (dict(max_grad_norm=INF), ValueError), (dict(max_grad_norm=0.0), ValueError),
    (dict(clip_low=NAN), ValueError), (dict(clip_high=INF), ValueError), (dict(entropy_coef=NAN), ValueError),
    (dict(temperature=0.0), ValueError), (dict(temperature=1e-40), ValueError), (dict(micro_batch_tokens=True), TypeError),
    (dict(mini_batches=0), ValueError), (dict(old_logprobs=None), ValueError),
    (dict(activation_checkpointing=1), TypeError), (dict(optimizer_offload=["cpu"]), ValueError),
    (dict(resident_state_fraction=NAN), ValueError), (dict(lr_schedule=0.5), TypeError),
])
def test_config_rejects_what_it_cannot_use(change, error):
    (field, value), = change.items()
    with pytest.raises(error, match=f"UpdateConfig.{field} must"):
        UpdateConfig(**change)
    # assigned later, the same check (the next update reads the field)
    config = UpdateConfig()
    with pytest.raises(error, match=f"UpdateConfig.{field} must"):
        setattr(config, field, value)
    assert getattr(config, field) == getattr(UpdateConfig(), field)


def test_config_refuses_an_option_it_does_not_have():
    """A typo in a live edit (update.config.learning_rate = ...) would be stored and never read."""
    config = UpdateConfig()
    with pytest.raises(AttributeError, match="UpdateConfig has no option 'learning_rate'; the options are lr, "):
        config.learning_rate = 3e-7
    config.lr = 3e-7
    assert config.lr == 3e-7


def test_config_accepts_numpy_numbers_and_says_how_to_fix_a_string():
    config = UpdateConfig(lr=np.float32(1e-6), micro_batch_tokens=np.int64(512), betas=[0.9, 0.95])
    assert config.micro_batch_tokens == 512
    with pytest.raises(TypeError, match="without quotes"):
        UpdateConfig(lr="1e-6")


# rollouts


@pytest.mark.parametrize("kwargs,error,pattern", [
    # numpy old logprobs one too long (beside one too short, the issue trained on shifted values)
    (dict(old_logprobs=np.zeros(4)), ValueError, "old_logprobs has 4 entries for 3"),
    (dict(old_logprobs=np.zeros(2)), ValueError, "old_logprobs has 2 entries for 3"),
    (dict(advantage=np.ones(4)), ValueError, "advantage has 4 entries for 3 completion tokens.*single number"),
    (dict(advantage=torch.ones(2)), ValueError, "advantage has 2 entries"),
    (dict(loss_mask=torch.ones(5, dtype=torch.bool)), ValueError, "loss_mask has 5 entries"),
    (dict(loss_mask=[1, 2, 0]), ValueError, "loss_mask must hold bools"),
    (dict(old_logprobs=np.zeros((3, 1))), ValueError, "old_logprobs must be 1-D"),
    (dict(advantage="1.0"), TypeError, "advantage must hold real numbers"),
    (dict(advantage=None), TypeError, "advantage must hold real numbers"),
    (dict(prompt_ids="123"), TypeError, "prompt_ids must be a sequence of numbers"),
    (dict(prompt_ids=[1.0, 2.5]), TypeError, "prompt_ids must hold integers"),
    (dict(completion_ids=np.array([4, -1, 5])), ValueError, "completion_ids holds the negative token id -1"),
    (dict(prompt_ids=[12, 13, -1, 14]), ValueError, "negative token id"),
    (dict(prompt_ids=[]), ValueError, "prompt_ids is empty"),
])
def test_rollout_fields_are_checked_whatever_their_container(kwargs, error, pattern):
    base = dict(prompt_ids=[1, 2], completion_ids=[3, 4, 5], advantage=1.0, old_logprobs=[-1.0] * 3)
    with pytest.raises(error, match=pattern):
        Rollout(**{**base, **kwargs})


def test_arrays_and_tensors_train_like_lists_and_ids_past_the_vocabulary_fail_by_name():
    lists = short_rollouts(2, seed=1)
    arrays = [Rollout(np.asarray(r.prompt_ids), torch.tensor(r.completion_ids),
                      r.advantage if isinstance(r.advantage, float) else np.asarray(r.advantage, np.float32),
                      np.asarray(r.old_logprobs, np.float32), torch.ones(len(r.completion_ids), dtype=torch.bool))
              for r in lists]
    results = []
    for rollouts in (lists, arrays):
        model = tiny_model("cpu")
        PolicyUpdate(model, UpdateConfig(**CONFIG))(rollouts)
        results.append(weights(model))
    assert same(*results)
    update = PolicyUpdate(tiny_model("cpu"), UpdateConfig(**CONFIG))
    for bad in (TINY.vocab_size, 2**32 - 1):
        with pytest.raises(ValueError, match=f"rollout 1 holds the token id {bad}.*vocabulary"):
            update([lists[0], Rollout([1, bad], [3], 1.0, [-1.0])])


# weights loaded into the model after the update was built


def test_weights_loaded_into_the_model_are_not_reverted():
    """The issue: the master, copied at construction, was written over freshly loaded weights at
    the next step. Now the update notices and refuses; sync_from_model() makes them the start."""
    model, loaded = tiny_model("cpu"), tiny_model("cpu", seed=1)
    update = PolicyUpdate(model, UpdateConfig(**CONFIG))
    rollouts = short_rollouts()
    update(rollouts)
    model.load_state_dict(loaded.state_dict())
    with pytest.raises(RuntimeError, match="sync_from_model"):
        update(rollouts)
    assert same(weights(model), weights(loaded))  # refused before touching anything
    update.sync_from_model()
    update(rollouts)
    # the same as training those weights from the start (Adam's moments aside: compare a fresh
    # optimizer on both sides)
    fresh_model, fresh_loaded = tiny_model("cpu"), tiny_model("cpu", seed=1)
    update = PolicyUpdate(fresh_model, UpdateConfig(**CONFIG))
    fresh_model.load_state_dict(fresh_loaded.state_dict())
    update.sync_from_model()
    PolicyUpdate(fresh_loaded, UpdateConfig(**CONFIG))(rollouts)
    update(rollouts)
    assert same(weights(fresh_model), weights(fresh_loaded))
    assert not same(weights(fresh_model), weights(tiny_model("cpu", seed=1)))


# saving and resuming


@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
def test_resume_is_bitwise(offloaded):
    """Train 2 steps, save, build a fresh update on a fresh model, load, train step 3 on both:
    bitwise equal weights and optimizer state. Offloaded: saved and loaded while the state is in
    host memory. The lr schedule makes step 3's lr depend on the restored step count."""
    config = dict(CONFIG, lr_schedule=lambda step: 1.0 / (step + 1), mini_batches=2)
    rollouts = short_rollouts(4, seed=2)
    model = tiny_model("cpu")
    update = PolicyUpdate(model, UpdateConfig(**config))
    assert update(rollouts)["steps"] == 2
    if offloaded:
        update.optimizer.offload()
    buffer = io.BytesIO()
    torch.save(update.state_dict(), buffer)
    if offloaded:
        update.optimizer.onload()

    resumed_model = tiny_model("cpu", seed=3)
    resumed = PolicyUpdate(resumed_model, UpdateConfig(**config))
    if offloaded:
        resumed.optimizer.offload()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    if offloaded:
        resumed.optimizer.onload()
    assert same(weights(resumed_model), weights(model))
    assert resumed.optimizer.steps == 2

    third = short_rollouts(2, seed=5)
    for u in (update, resumed):
        u.config.mini_batches = 1
        assert u(third)["steps"] == 1
    assert same(weights(resumed_model), weights(model))
    assert same(update.optimizer._state_tensors(), resumed.optimizer._state_tensors())
    assert update.state_dict()["adam_step"] == resumed.state_dict()["adam_step"] == [3.0, 3.0]


def test_resume_on_another_model_shape_says_so():
    state = PolicyUpdate(tiny_model("cpu"), UpdateConfig()).state_dict()
    other = Decoder(dataclasses.replace(TINY, hidden_size=84), device="cpu", dtype=torch.float32)
    other.init_weights(0)
    update = PolicyUpdate(other, UpdateConfig())
    with pytest.raises(ValueError, match=r"model with other parameters \(embed_tokens \(301, 72\) there, embed_tokens \(301, 84\) here\)"):
        update.load_state_dict(state)
    assert update.optimizer.steps == 0


# mini-batches without a loss token


def test_a_mini_batch_without_loss_tokens_takes_no_step():
    """The issue: an all-masked mini-batch still ran AdamW (momentum moved the weights, Adam's step
    count advanced) and grad_norm averaged in its 0."""
    model = tiny_model("cpu")
    update = PolicyUpdate(model, UpdateConfig(**CONFIG))
    rollouts = short_rollouts()
    update(rollouts)  # Adam's momentum is nonzero from here
    before, adam_before = weights(model), adam_steps(update)
    masked = [Rollout(r.prompt_ids, r.completion_ids, r.advantage, r.old_logprobs,
                      [False] * len(r.completion_ids)) for r in rollouts]
    metrics = update(masked)
    assert same(weights(model), before)
    assert adam_steps(update) == adam_before == [1.0, 1.0]
    assert metrics["steps"] == 0 and metrics["loss_tokens"] == 0
    assert "grad_norm" not in metrics and "loss" not in metrics  # not computed: absent, not 0

    # one empty mini-batch beside a full one: one step, and grad_norm is that step's alone
    twin = tiny_model("cpu", seed=1)
    alone, mixed = PolicyUpdate(twin, UpdateConfig(**CONFIG)), PolicyUpdate(tiny_model("cpu", seed=1),
                                                                              UpdateConfig(**CONFIG, mini_batches=2))
    want = alone(rollouts)
    got = mixed(masked + rollouts)
    assert got["steps"] == 1 and got["grad_norm"] == want["grad_norm"] and got["loss"] == want["loss"]
    assert same(weights(mixed.model), weights(twin))


# NaN and inf on counted tokens


@pytest.mark.parametrize("field,value", [("old_logprobs", NAN), ("advantage", NAN), ("advantage", INF),
                                         ("advantage", -INF)])
def test_a_non_finite_counted_input_skips_the_step_on_both_paths(loss_path, field, value):
    """The issue: a NaN old logprob on a counted token gave a NaN loss but a step on the torch
    path (zero gradient for that token) and finite values on the Triton path (NaN read as log
    ratio -20). Both paths now report NaN and skip the step; the next update trains. (A NaN
    advantage was skipped before too; the metrics now say NaN on both paths.)"""
    model = tiny_model("cpu")
    update = PolicyUpdate(model, UpdateConfig(**CONFIG))
    rollouts = short_rollouts()
    r = rollouts[1]
    values = [r.advantage] * len(r.completion_ids) if field == "advantage" else list(r.old_logprobs)
    values[1] = value
    poisoned = rollouts[:1] + [Rollout(r.prompt_ids, r.completion_ids, values if field == "advantage" else r.advantage,
                                       values if field == "old_logprobs" else r.old_logprobs)] + rollouts[2:]
    before = weights(model)
    metrics = update(poisoned)
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 1
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["mean_ratio"])
    assert same(weights(model), before) and update.optimizer.steps == 0
    assert update(rollouts)["skipped_steps"] == 0 and not same(weights(model), before)


def test_a_nan_under_the_mask_still_trains(loss_path):
    model = tiny_model("cpu")
    r = short_rollouts(1)[0]
    old = list(r.old_logprobs)
    old[0] = NAN
    mask = [True] * len(old)
    mask[0] = False
    metrics = PolicyUpdate(model, UpdateConfig(**CONFIG))([Rollout(r.prompt_ids, r.completion_ids, 1.0, old, mask)])
    assert metrics["skipped_steps"] == 0 and math.isfinite(metrics["loss"])


# the learning rate


def test_lr_changed_after_construction_and_scheduled_takes_effect():
    """The issue: update.config.lr changed after construction had no effect, and there was no
    schedule. Now the config is read at every step; lr_schedule multiplies it by step."""
    rollouts = short_rollouts(2, seed=6)
    changed_model, direct_model, scheduled_model = tiny_model("cpu"), tiny_model("cpu"), tiny_model("cpu")
    changed = PolicyUpdate(changed_model, UpdateConfig(**CONFIG))
    changed.config.lr = 2 * CONFIG["lr"]
    PolicyUpdate(direct_model, UpdateConfig(**{**CONFIG, "lr": 2 * CONFIG["lr"]}))(rollouts)
    changed(rollouts)
    assert same(weights(changed_model), weights(direct_model))

    calls = []
    scheduled = PolicyUpdate(scheduled_model, UpdateConfig(**{**CONFIG, "lr": CONFIG["lr"]},
                                                           lr_schedule=lambda step: calls.append(step) or 2.0))
    scheduled(rollouts)
    assert same(weights(scheduled_model), weights(direct_model)) and calls == [0]
    scheduled.config.mini_batches = 2
    scheduled(rollouts)
    assert calls == [0, 1, 2]
    scheduled.config.lr_schedule = lambda step: NAN
    with pytest.raises(ValueError, match=r"UpdateConfig.lr_schedule\(3\) returned nan"):
        scheduled(rollouts)


# metrics


def test_auto_policy_loss_follows_the_hidden_size(monkeypatch):
    """'auto' (the default) takes the fused loss where it measured faster (H >= 896), the
    composable one below; the other two choices are taken as given."""
    import fastazr.update.policy_update as module
    model = tiny_model("cpu")
    hidden = model.lm_head_weight.shape[1]
    assert not PolicyUpdate(model, UpdateConfig(**CONFIG)).fused_loss
    monkeypatch.setattr(module, "FUSED_LOSS_MIN_HIDDEN", hidden)
    assert PolicyUpdate(model, UpdateConfig(**CONFIG)).fused_loss
    assert not PolicyUpdate(model, UpdateConfig(**{**CONFIG, "policy_loss": "composable"})).fused_loss
    monkeypatch.setattr(module, "FUSED_LOSS_MIN_HIDDEN", hidden + 1)
    update = PolicyUpdate(model, UpdateConfig(**{**CONFIG, "policy_loss": "fused"}))
    assert update.fused_loss
    update.config.policy_loss = "auto"  # read at each update, like the other fields
    assert not update.fused_loss
    with pytest.raises(ValueError, match="policy_loss"):
        UpdateConfig(policy_loss="fast")


def test_metrics_not_computed_are_absent():
    """The issue: `entropy` read 0.0 when entropy_coef = 0 never computed it. The composable loss
    computes it only for the entropy bonus; the fused one always does, at no cost."""
    config = {**CONFIG, "entropy_coef": 0.0, "policy_loss": "composable"}
    metrics = PolicyUpdate(tiny_model("cpu"), UpdateConfig(**config))(short_rollouts())
    assert "entropy" not in metrics and {"loss", "clip_fraction", "approx_kl", "mean_ratio", "grad_norm"} <= set(metrics)
    config["policy_loss"] = "fused"
    metrics = PolicyUpdate(tiny_model("cpu"), UpdateConfig(**config))(short_rollouts())
    assert metrics["entropy"] > 0
    metrics = PolicyUpdate(tiny_model("cpu"), UpdateConfig(**CONFIG))(short_rollouts())
    assert metrics["entropy"] > 0
