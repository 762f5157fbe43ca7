"""UpdateConfig: every knob of the policy update and of the memory phases around it, checked
when it is built."""

from __future__ import annotations

from dataclasses import dataclass

OLD_LOGPROBS = ("engine", "recompute")
OFFLOAD = ("auto", "cpu", "gpu")


@dataclass
class UpdateConfig:
    lr: float = 1e-6
    """AdamW learning rate (Absolute Zero trains at 1e-6)."""

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
        if not self.lr > 0:
            raise ValueError(f"UpdateConfig.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"UpdateConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"UpdateConfig.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"UpdateConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"UpdateConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if not (0.0 <= self.clip_low < 1.0 and self.clip_high >= 0.0):
            raise ValueError(f"UpdateConfig.clip_low must be in [0, 1) and clip_high >= 0, got "
                             f"{self.clip_low}, {self.clip_high}")
        if self.entropy_coef < 0:
            raise ValueError(f"UpdateConfig.entropy_coef must be >= 0, got {self.entropy_coef}")
        if not self.temperature > 0:
            raise ValueError(f"UpdateConfig.temperature must be > 0 (greedy rollouts are scored at 1.0), "
                             f"got {self.temperature}")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"UpdateConfig.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.mini_batches < 1:
            raise ValueError(f"UpdateConfig.mini_batches must be >= 1, got {self.mini_batches}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"UpdateConfig.old_logprobs must be one of {OLD_LOGPROBS}, got {self.old_logprobs!r}")
        if self.optimizer_offload not in OFFLOAD:
            raise ValueError(f"UpdateConfig.optimizer_offload must be one of {OFFLOAD}, "
                             f"got {self.optimizer_offload!r}")
        if not 0.0 <= self.resident_state_fraction <= 1.0:
            raise ValueError(f"UpdateConfig.resident_state_fraction must be in [0, 1], "
                             f"got {self.resident_state_fraction}")
