"""The policy update: one call trains on a phase's rollouts and returns its metrics.

    update = PolicyUpdate(model, UpdateConfig(micro_batch_tokens=16384))
    metrics = update(rollouts)

For each mini-batch (one optimizer step): micro-batches of packed sequences run the model's
forward in bf16, fastazr.kernels.linear_logprobs scores the completion tokens straight from the
hidden states (no logits tensor), fastazr.kernels.pg_loss gives the PPO-clip loss divided by the
mini-batch's total count of loss tokens (so the micro-batches' gradients add up to the one big
batch's), backward, and the bf16 gradients go into the fp32 buffer of MasterOptimizer, whose step
clips, runs AdamW on fp32 master weights and refreshes the bf16 parameters in place."""

from __future__ import annotations

import torch
from torch import nn

from fastazr.kernels import linear_logprobs, pg_loss

from .config import UpdateConfig
from .optimizer import MasterOptimizer
from .rollouts import MicroBatch, Rollout, build_micro_batch, plan_micro_batches

METRICS = ("loss", "clip_fraction", "approx_kl", "mean_ratio", "entropy")


def split_mini_batches(count: int, parts: int) -> list[range]:
    """count items in order into `parts` contiguous groups of sizes differing by at most one."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class PolicyUpdate:
    def __init__(self, model: nn.Module, config: UpdateConfig | None = None):
        self.model = model
        self.config = config or UpdateConfig()
        model.activation_checkpointing = self.config.activation_checkpointing
        self.optimizer = MasterOptimizer(model, self.config)

    def micro_batches(self, rollouts: list[Rollout], indices: range) -> list[MicroBatch]:
        lengths = [rollouts[i].num_tokens for i in indices]
        bins = plan_micro_batches(lengths, self.config.micro_batch_tokens)
        device = self.model.device
        return [build_micro_batch(rollouts, [indices[j] for j in b], device) for b in bins]

    def _logprobs(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        out = linear_logprobs(hidden[batch.rows], self.model.lm_head_weight, batch.targets,
                              self.config.temperature, return_entropy=self.config.entropy_coef > 0)
        return out if isinstance(out, tuple) else (out, None)

    @torch.no_grad()
    def _recompute_old(self, plans: list[list[MicroBatch]]) -> None:
        self.model.eval()
        for batch in (b for plan in plans for b in plan):
            batch.old_logprobs = self._logprobs(batch)[0]

    def __call__(self, rollouts: list[Rollout]) -> dict[str, float]:
        """Train on the rollouts: mini_batches optimizer steps. Returns the means over the update
        of the loss and its metrics (token-weighted), the gradient norm before clipping, token
        counts, steps, and skipped_steps (a non-finite gradient norm leaves the weights alone)."""
        if not rollouts:
            raise ValueError("PolicyUpdate got no rollouts: nothing to train on")
        self.optimizer.check_onloaded()
        config = self.config
        if config.old_logprobs == "engine" and any(r.old_logprobs is None for r in rollouts):
            raise ValueError("a Rollout has old_logprobs=None: pass the engine's Completion.logprobs, or set "
                             "UpdateConfig.old_logprobs='recompute'")
        plans = [self.micro_batches(rollouts, group) for group in split_mini_batches(len(rollouts), config.mini_batches)]
        if config.old_logprobs == "recompute":
            self._recompute_old(plans)
        self.model.train()
        device = self.model.device
        sums = torch.zeros(len(METRICS), dtype=torch.float32, device=device)
        norms = []
        loss_tokens, skipped = 0, self.optimizer.skipped
        for plan in plans:
            normalizer = sum(b.num_loss_tokens for b in plan)
            for batch in plan:
                logprobs, entropy = self._logprobs(batch)
                out = pg_loss(logprobs, batch.old_logprobs, batch.advantages, batch.mask, config.clip_low,
                              config.clip_high, entropy, config.entropy_coef, normalizer)
                out.loss.backward()
                self.optimizer.accumulate()
                # metrics come back divided by this mini-batch's count: weight them back to sums
                sums += torch.stack([t.detach() for t in out]) * normalizer
            norms.append(self.optimizer.step())
            loss_tokens += normalizer
        self.model.eval()
        values = (sums / max(loss_tokens, 1)).tolist()
        metrics = dict(zip(METRICS, values))
        metrics.update(grad_norm=float(torch.stack(norms).mean()), steps=len(plans),
                       skipped_steps=self.optimizer.skipped - skipped, loss_tokens=loss_tokens,
                       tokens=sum(b.num_tokens for plan in plans for b in plan),
                       micro_batches=sum(len(plan) for plan in plans))
        return metrics
