"""The policy update: one call trains on a phase's rollouts and returns its metrics.

    update = PolicyUpdate(model, UpdateConfig(micro_batch_tokens=16384))
    metrics = update(rollouts)

For each mini-batch (one optimizer step): micro-batches of packed sequences run the model's
forward in bf16, fastazr.kernels.linear_logprobs scores the completion tokens straight from the
hidden states (no logits tensor), fastazr.kernels.pg_loss gives the PPO-clip loss divided by the
mini-batch's total count of loss tokens (so the micro-batches' gradients add up to the one big
batch's); UpdateConfig.policy_loss='fused' (and 'auto' from a hidden size of 896 up) does both
in fastazr.kernels.linear_pg_loss, which makes the gradient in the forward instead of
recomputing the logits. Then backward, and the bf16 gradients go into the fp32 buffer of
MasterOptimizer, whose step clips, runs AdamW on fp32 master weights and refreshes the bf16
parameters in place.

A mini-batch without a loss token is no step at all (Adam's momentum would still move the
weights). A non-finite loss or gradient norm (a NaN or inf advantage, a NaN logprob on a counted
token) skips its step. To resume: `update.load_state_dict(saved)`, with `saved` from
`update.state_dict()` (torch.save-able); after loading weights into the model any other way,
`update.sync_from_model()` before the next update."""

from __future__ import annotations

import torch
from torch import nn

from fastazr.kernels import linear_logprobs, linear_pg_loss, pg_loss

from .config import UpdateConfig
from .optimizer import MasterOptimizer
from .rollouts import MicroBatch, Rollout, build_micro_batch, plan_micro_batches

METRICS = ("loss", "clip_fraction", "approx_kl", "mean_ratio", "entropy")
# UpdateConfig.policy_loss='auto' takes the fused loss from this hidden size up. With its fp16
# exps (H100, N = 16K, forward + backward against linear_logprobs + pg_loss): 6.37 against 6.18
# ms at H = 576 (V = 49,152: the row traffic still outweighs the recompute it saves there), 8.34
# against 8.93 at 896, 38.2 against 45.5 at 1536 and 82.2 against 107.8 at 3584 (V = 151,936).
FUSED_LOSS_MIN_HIDDEN = 896


def split_mini_batches(count: int, parts: int) -> list[range]:
    """count items in order into `parts` contiguous groups of sizes differing by at most one."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class PolicyUpdate:
    def __init__(self, model: nn.Module, config: UpdateConfig | None = None,
                 optimizer: MasterOptimizer | None = None):
        """optimizer: default, a MasterOptimizer over the model's parameters (a data-parallel run
        passes its sharded one, fastazr.distributed.DataParallelUpdate)."""
        self.model = model
        self.config = config or UpdateConfig()
        model.activation_checkpointing = self.config.activation_checkpointing
        self.optimizer = optimizer or MasterOptimizer(model, self.config)

    @property
    def fused_loss(self) -> bool:
        """Whether the next update takes linear_pg_loss (UpdateConfig.policy_loss, read each time
        like the other fields)."""
        policy_loss = self.config.policy_loss
        return policy_loss == "fused" or (policy_loss == "auto" and
                                          self.model.lm_head_weight.shape[1] >= FUSED_LOSS_MIN_HIDDEN)

    def sync_from_model(self) -> None:
        """Train from the model's current weights (loaded into it after this update was built):
        they become the fp32 master; Adam's moments and step count stay."""
        self.optimizer.load_from_model()

    def state_dict(self, copy: bool = True) -> dict:
        """The optimizer's state (MasterOptimizer.state_dict, copy=False: its live tensors): all
        an exact resume needs besides the UpdateConfig, which the caller rebuilds."""
        return self.optimizer.state_dict(copy)

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(): the master, Adam's state and step counts, and the model's
        parameters rewritten from the master. The model must have the same parameter shapes."""
        self.optimizer.load_state_dict(state)

    def micro_batches(self, rollouts: list[Rollout], indices: range) -> list[MicroBatch]:
        lengths = [rollouts[i].num_tokens for i in indices]
        bins = plan_micro_batches(lengths, self.config.micro_batch_tokens)
        device, vocab = self.model.device, self.model.config.vocab_size
        return [build_micro_batch(rollouts, [indices[j] for j in b], device, vocab) for b in bins]

    def _hidden(self, batch: MicroBatch) -> torch.Tensor:
        """The hidden states of the rows that score completion tokens."""
        return self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)[batch.rows]

    def _logprobs(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = linear_logprobs(self._hidden(batch), self.model.lm_head_weight, batch.targets,
                              self.config.temperature, return_entropy=self.config.entropy_coef > 0)
        return out if isinstance(out, tuple) else (out, None)

    def _loss(self, batch: MicroBatch, normalizer: int):
        """The micro-batch's PPO-clip loss (divided by the mini-batch's token count) and metrics."""
        config = self.config
        if not self.fused_loss:
            logprobs, entropy = self._logprobs(batch)
            return pg_loss(logprobs, batch.old_logprobs, batch.advantages, batch.mask, config.clip_low,
                           config.clip_high, entropy, config.entropy_coef, normalizer)
        return linear_pg_loss(self._hidden(batch), self.model.lm_head_weight, batch.targets, batch.old_logprobs,
                              batch.advantages, batch.mask, config.clip_low, config.clip_high, config.temperature,
                              config.entropy_coef, normalizer)

    @torch.no_grad()
    def _recompute_old(self, plans: list[list[MicroBatch]]) -> None:
        self.model.eval()
        for batch in (b for plan in plans for b in plan):
            batch.old_logprobs = self._logprobs(batch)[0]

    def __call__(self, rollouts: list[Rollout], groups: list[range] | None = None) -> dict[str, float]:
        """Train on the rollouts: one optimizer step per mini-batch that has loss tokens. Returns
        the means over the update of the loss and its metrics (token-weighted; entropy only when
        computed: entropy_coef > 0, or the fused loss, which always computes it; none of them
        without a loss token), the mean gradient norm
        before clipping (absent without a step), token counts, steps (attempted) and
        skipped_steps (a non-finite loss or gradient norm leaves the weights alone).
        groups: which rollouts (indices) form each mini-batch; default config.mini_batches
        contiguous groups, in order. A data-parallel rank passes its share of each global
        mini-batch, which may be empty."""
        if groups is None:
            if not rollouts:
                raise ValueError("PolicyUpdate got no rollouts: nothing to train on")
            groups = split_mini_batches(len(rollouts), self.config.mini_batches)
        self.optimizer.check_onloaded()
        if not self.optimizer.in_sync():
            raise RuntimeError("the model's parameters were changed after PolicyUpdate was built (e.g. a "
                               "checkpoint loaded into the model): the next step would overwrite them with the "
                               "optimizer's fp32 master. Call update.sync_from_model() to train from them, or "
                               "update.load_state_dict(saved) to resume a saved run")
        config = self.config
        if config.old_logprobs == "engine" and any(r.old_logprobs is None for r in rollouts):
            raise ValueError("a Rollout has old_logprobs=None: pass the engine's Completion.logprobs, or set "
                             "UpdateConfig.old_logprobs='recompute'")
        plans = [self.micro_batches(rollouts, group) for group in groups]
        # no loss token, no step: its gradient is 0, but AdamW's momentum and decay would still
        # move the weights and advance the step count
        counts = self._total([sum(b.num_loss_tokens for b in plan) for plan in plans])
        plans, counts = [p for p, n in zip(plans, counts) if n], [n for n in counts if n]
        if config.old_logprobs == "recompute":
            self._recompute_old(plans)
        self.model.activation_checkpointing = config.activation_checkpointing
        self.model.train()
        device = self.model.device
        sums = torch.zeros(len(METRICS), dtype=torch.float32, device=device)
        norms = []
        loss_tokens, skipped = 0, self.optimizer.skipped
        for plan, normalizer in zip(plans, counts):
            finite = torch.ones((), dtype=torch.bool, device=device)
            for k, batch in enumerate(plan):
                out = self._loss(batch, normalizer)
                self._backward(out.loss, last=k == len(plan) - 1)
                # the loss is checked too, not only the gradient norm: a NaN that reaches no
                # gradient (an entropy term's, say) must not let the step through either
                finite &= torch.isfinite(out.loss.detach())
                # metrics come back divided by this mini-batch's count: weight them back to sums
                sums += torch.stack([t.detach() for t in out[:len(METRICS)]]) * normalizer
            norms.append(self.optimizer.step(finite))
            loss_tokens += normalizer
        self.model.eval()
        sums = self._sum(sums)
        metrics = {}
        if loss_tokens:
            computed = METRICS if config.entropy_coef > 0 or self.fused_loss else METRICS[:-1]
            metrics.update(zip(computed, (sums / loss_tokens).tolist()))
        if norms:
            metrics["grad_norm"] = float(torch.stack(norms).mean())
        tokens, micro_batches = self._total([sum(b.num_tokens for plan in plans for b in plan),
                                             sum(len(plan) for plan in plans)])
        metrics.update(steps=len(plans), skipped_steps=self.optimizer.skipped - skipped, loss_tokens=loss_tokens,
                       tokens=tokens, micro_batches=micro_batches)
        return metrics

    # what a data-parallel update (fastazr.distributed.DataParallelUpdate) does over its ranks

    def _total(self, counts: list[int]) -> list[int]:
        """Counts over the whole batch: this process holds all of it."""
        return counts

    def _sum(self, sums: torch.Tensor) -> torch.Tensor:
        """Metric sums over the whole batch."""
        return sums

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch (`last`: of its mini-batch), its gradients into the fp32 buffer."""
        loss.backward()
        self.optimizer.accumulate()
