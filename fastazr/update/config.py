"""UpdateConfig: every knob of the policy update and of the memory phases around it, checked
when it is built and whenever a field is assigned afterwards."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields

from ..rollout.request import MIN_TEMPERATURE

OLD_LOGPROBS = ("engine", "recompute")
POLICY_LOSSES = ("auto", "fused", "composable")
OFFLOAD = ("auto", "cpu", "gpu")


@dataclass
class UpdateConfig:
    """Every field may be changed between updates (`update.config.lr = 3e-7`): the assignment is
    checked like the constructor's arguments, and the next update reads it. Only optimizer_offload
    and resident_state_fraction are read once, when ColocatedMemory is built."""

    lr: float = 1e-6
    """AdamW learning rate (Absolute Zero trains at 1e-6); each step uses lr * lr_schedule(step)."""

    lr_schedule: Callable[[int], float] | None = None
    """Optional multiplier of lr: called with the number of optimizer steps taken before this one
    (0 for the first, restored by load_state_dict, so a resumed run continues its schedule), it
    returns a finite number >= 0. E.g. a linear warmup over 100 steps:
    `lambda step: min(1.0, (step + 1) / 100)`. None: lr throughout."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates."""

    eps: float = 1e-8
    """AdamW's denominator epsilon."""

    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (never to norms or biases)."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of each optimizer step to this; None turns clipping off."""

    clip_low: float = 0.2
    """PPO ratio clip below 1: ratios under 1 - clip_low stop pushing."""

    clip_high: float = 0.2
    """PPO ratio clip above 1 (> clip_low gives the asymmetric "clip-higher" range)."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus; > 0 also computes each token's entropy (a few % more work)."""

    temperature: float = 1.0
    """The sampling temperature of the rollouts: logprobs are of softmax(logits / temperature),
    the quantity the engine reports."""

    micro_batch_tokens: int = 16384
    """Token budget of one forward/backward (prompt + completion tokens, packed without padding).
    A sequence longer than this gets a micro-batch of its own."""

    mini_batches: int = 1
    """Optimizer steps per update: the rollouts are split into this many groups, in order, and each
    group is one step (gradients accumulated over its micro-batches)."""

    old_logprobs: str = "engine"
    """Where the PPO ratio's denominator comes from: 'engine' (each Rollout.old_logprobs, the
    sampler's own) or 'recompute' (a no-grad pass with the weights before the first step)."""

    policy_loss: str = "auto"
    """How the PPO-clip loss meets the lm_head: 'fused' (fastazr.kernels.linear_pg_loss: the
    gradient made in the forward from each row chunk's softmax, kept as fp16 exps, 6*N*H*V FLOP
    plus ~6 bytes of memory traffic a logit), 'composable' (linear_logprobs + pg_loss: logits
    never stored, recomputed in backward, 8*N*H*V) or 'auto': fused from a hidden size of 896
    up, where the FLOP it saves outweigh its traffic. H100, N = 16K, bf16, fwd + bwd, fused vs
    composable (bench_logprob.py, random inputs): 6.37 vs 6.18 ms at SmolLM2's H = 576 (V =
    49,152), 8.34 vs 8.93 at 896, 38.2 vs 45.5 at 1536 and 82.2 vs 107.8 at 3584 (V = 151,936).
    Both give the same logprobs and loss to fp32 rounding and the same gradients to bf16
    rounding (the fused loss rounds the lm_head's gradient once per chunk of ~2,100 rows, the
    other once)."""

    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward: a layer's activations instead of all of them
    stay alive, for ~1/3 more compute."""

    optimizer_offload: str = "auto"
    """Where the fp32 master weights and Adam moments live while the engine generates: 'cpu'
    (pinned host memory, copied on a side stream), 'gpu' (stay resident), or 'auto' (resident when
    they take at most resident_state_fraction of the GPU's memory)."""

    resident_state_fraction: float = 0.25
    """'auto' offloading's threshold, as a share of the GPU's total memory: above it, the KV cache
    gains more from the memory than the swap costs."""

    def __post_init__(self) -> None:
        for field in fields(self):
            check_field(field.name, getattr(self, field.name))

    def __setattr__(self, name: str, value) -> None:
        # Fields are first set by the generated __init__ (checked together in __post_init__); a
        # later assignment is checked here, before the next update can read it.
        if name in self.__dict__:
            check_field(name, value)
        elif name not in self.__dataclass_fields__:
            # a typo (config.learning_rate = ...) would be stored and never read
            raise AttributeError(f"UpdateConfig has no option {name!r}; the options are "
                                 f"{', '.join(f.name for f in fields(self))}")
        super().__setattr__(name, value)


def _real(name: str, value, hint: str) -> float:
    """A finite real number (bool and numeric strings refused), or a TypeError/ValueError naming
    UpdateConfig.<name> and what it takes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"UpdateConfig.{name} must be a real number ({hint}), got {type(value).__name__} "
                        f"{value!r}" + (": write it without quotes" if isinstance(value, str) else ""))
    if not math.isfinite(value):
        raise ValueError(f"UpdateConfig.{name} must be finite ({hint}), got {value}")
    return float(value)


def _integer(name: str, value, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"UpdateConfig.{name} must be an int ({hint}), got {type(value).__name__} {value!r}")
    return int(value)


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"UpdateConfig.{name} must be one of {choices}, got {value!r}")


def check_field(name: str, value) -> None:
    """Raise if `value` is not a valid UpdateConfig.<name>; the message says what to change."""
    if name == "lr":
        if not _real(name, value, "the AdamW learning rate, e.g. 1e-6") > 0:
            raise ValueError(f"UpdateConfig.lr must be > 0, got {value}")
    elif name == "lr_schedule":
        if value is not None and not callable(value):
            raise TypeError(f"UpdateConfig.lr_schedule must be None or a callable step -> multiplier of lr, "
                            f"got {type(value).__name__} {value!r}")
    elif name == "betas":
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not all(0.0 <= _real(name, b, "two numbers in [0, 1)") < 1.0 for b in value)):
            raise ValueError(f"UpdateConfig.betas must be two numbers in [0, 1), got {value!r}")
    elif name == "eps":
        if not _real(name, value, "AdamW's epsilon, e.g. 1e-8") > 0:
            raise ValueError(f"UpdateConfig.eps must be > 0, got {value}")
    elif name == "weight_decay":
        if not _real(name, value, "decoupled weight decay, 0 for none") >= 0:
            raise ValueError(f"UpdateConfig.weight_decay must be >= 0, got {value}")
    elif name == "max_grad_norm":
        if value is not None and not _real(name, value, "a norm > 0, or None for no clipping") > 0:
            raise ValueError(f"UpdateConfig.max_grad_norm must be > 0 or None (no clipping), got {value}")
    elif name == "clip_low":
        if not 0.0 <= _real(name, value, "in [0, 1)") < 1.0:
            raise ValueError(f"UpdateConfig.clip_low must be in [0, 1) (ratios are clipped below at "
                             f"1 - clip_low), got {value}")
    elif name == "clip_high":
        if not _real(name, value, ">= 0") >= 0:
            raise ValueError(f"UpdateConfig.clip_high must be >= 0 (ratios are clipped above at "
                             f"1 + clip_high), got {value}")
    elif name == "entropy_coef":
        if not _real(name, value, "the entropy bonus weight, 0 for none") >= 0:
            raise ValueError(f"UpdateConfig.entropy_coef must be >= 0, got {value}")
    elif name == "temperature":
        if not _real(name, value, "the rollouts' sampling temperature") >= MIN_TEMPERATURE:
            raise ValueError(f"UpdateConfig.temperature must be >= {MIN_TEMPERATURE}, the lowest the engine samples "
                             f"at (greedy rollouts are scored at 1.0; below it logits / T overflow and every "
                             f"update would be skipped as NaN), got {value}")
    elif name == "micro_batch_tokens":
        if _integer(name, value, "a token budget, e.g. 16384") < 1:
            raise ValueError(f"UpdateConfig.micro_batch_tokens must be >= 1, got {value}")
    elif name == "mini_batches":
        if _integer(name, value, "optimizer steps per update") < 1:
            raise ValueError(f"UpdateConfig.mini_batches must be >= 1, got {value}")
    elif name == "old_logprobs":
        _choice(name, value, OLD_LOGPROBS)
    elif name == "policy_loss":
        _choice(name, value, POLICY_LOSSES)
    elif name == "activation_checkpointing":
        if not isinstance(value, bool):
            raise TypeError(f"UpdateConfig.activation_checkpointing must be True or False, got "
                            f"{type(value).__name__} {value!r}")
    elif name == "optimizer_offload":
        _choice(name, value, OFFLOAD)
    elif name == "resident_state_fraction":
        if not 0.0 <= _real(name, value, "a share of the GPU's memory") <= 1.0:
            raise ValueError(f"UpdateConfig.resident_state_fraction must be in [0, 1], got {value}")
