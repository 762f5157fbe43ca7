"""ZeRO-1: the optimizer state of a data-parallel run sharded over its G ranks.

Every rank keeps the model's parameters whole (bf16 on the GPU: the engine generates from them)
and the flat fp32 gradient buffer (reducer.py), but only its shard of the fp32 master weights
and of AdamW's two moments: 12 / G bytes a parameter instead of 12, so a 7B model's 84 GB of
optimizer state takes 10.5 GB a GPU at G = 8. A step, after the last micro-batch's backward:

1. the gradient buckets are reduce-scattered (started during the backward): this rank holds its
   chunks of the gradient summed over ranks (every rank's loss is already divided by the global
   count of loss tokens, so the sum is the one big batch's gradient);
2. the global norm is one all-reduce of every shard's sum of squares (and of a flag for a
   non-finite loss on any rank): every rank clips by it and skips a non-finite step alike;
3. AdamW (torch's, fused on CUDA) steps this rank's shard: elementwise, so a shard steps exactly
   as those elements would in one process;
4. the shard is rounded to the parameters' dtype and all-gathered bucket by bucket into every
   rank's parameters, in place (the engine's CUDA graphs keep their addresses).

The optimizer state offloads while generating (ColocatedMemory) as one process's does, G times
smaller. Everything MasterOptimizer offers (offload, state_dict, in_sync, ...) works on the
shard; state_dict holds the shard and the layout it belongs to, and load_state_dict refuses one
of another world size or bucketing."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastazr.update.config import UpdateConfig
from fastazr.update.optimizer import MasterOptimizer, build_adamw

from .reducer import BucketLayout, GradientReducer, all_gather_flat
from .world import World


class ShardedOptimizer(MasterOptimizer):
    def __init__(self, model: nn.Module, config: UpdateConfig, world: World, bucket_elements: int):
        # MasterOptimizer's buffers would be the whole model's: its __init__ is not run, its
        # methods work on the attributes set here
        self.config, self.world = config, world
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"ShardedOptimizer needs parameters of one dtype (they are all-gathered as one "
                             f"buffer), got {sorted(map(str, dtypes))}: load the model in one dtype")
        self.device = self.params[0].device
        self.layout = BucketLayout(self.params, world.size, bucket_elements)
        shard = self.layout.shard_size
        self.grad = torch.zeros(self.layout.total, dtype=torch.float32, device=self.device)
        self.shard_grad = torch.zeros(shard, dtype=torch.float32, device=self.device)
        self.master = torch.zeros(shard, dtype=torch.float32, device=self.device)
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.master), torch.zeros_like(self.master)
        decayed, rest = self.layout.decay_ranges(world.rank)
        views = []
        for a, z in decayed + rest:
            view = self.master[a:z]
            view.grad = self.shard_grad[a:z]
            views.append(view)
        self.optimizer = build_adamw(config, views[:len(decayed)], views[len(decayed):],
                                     [(self.exp_avg[a:z], self.exp_avg_sq[a:z]) for a, z in decayed + rest])
        self.reducer = GradientReducer(self.layout, self.params, self.grad, self.shard_grad)
        self._start_tracking()
        self.load_from_model()

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's place in a buffer of the layout's total size (the gradient's)."""
        return [flat[s:s + p.numel()].view_as(p) for p, s in zip(self.params, self.layout.starts)]

    def _mine(self, bucket_flat: torch.Tensor, b) -> torch.Tensor:
        """This rank's chunk of a bucket-sized buffer."""
        return bucket_flat[self.world.rank * b.chunk:(self.world.rank + 1) * b.chunk]

    @torch.no_grad()
    def load_from_model(self) -> None:
        """This rank's shard of the master from the model's parameters (every rank's are equal),
        a bucket at a time: no full-size fp32 copy is ever made."""
        self.wait_onloaded()
        master = self._resident(self.master)
        for b in self.layout.buckets:
            flat = torch.zeros(b.size, dtype=torch.float32, device=self.device)
            for i in b.params:
                start = self.layout.starts[i] - b.start
                flat[start:start + self.params[i].numel()].copy_(self.params[i].reshape(-1))
            master[b.shard_start:b.shard_start + b.chunk].copy_(self._mine(flat, b))
        self._mark_written()

    @torch.no_grad()
    def _write_model(self) -> None:
        """Every rank's shard, rounded to the parameters' dtype, into every rank's parameters. The
        gathered buffer (2 bytes a parameter in bf16) lives for the copy only."""
        dtype = self.params[0].dtype
        # from host memory too (a checkpoint loaded while the state is offloaded): NCCL sends from the GPU
        shard = self._resident(self.master).to(self.device, dtype)
        gathered = torch.empty(self.layout.total, dtype=dtype, device=self.device)
        works = [all_gather_flat(gathered[b.start:b.start + b.size],
                                        shard[b.shard_start:b.shard_start + b.chunk], async_op=True)
                 for b in self.layout.buckets]
        for work in works:
            work.wait()
        for p, view in zip(self.params, self._views(gathered)):
            p.copy_(view)
        self._mark_written()

    def _reduced(self) -> torch.Tensor:
        self.reducer.finish()
        self.grad.zero_()  # the local sums are spent: the next mini-batch accumulates from zero
        return self.shard_grad

    def _norm(self, grad: torch.Tensor, loss_finite: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        bad_loss = torch.zeros((), device=grad.device) if loss_finite is None else (~loss_finite).float()
        # sums of squares over the ranks' disjoint shards: the whole gradient's, summed in
        # another order than one process's norm (fp32 rounding apart, the same number)
        totals = torch.stack([grad.pow(2).sum(), bad_loss.to(grad.device)])
        dist.all_reduce(totals)
        norm = totals[0].sqrt()
        return norm, torch.isfinite(norm) & (totals[1] == 0)

    def _gradients(self) -> list[torch.Tensor]:
        return [self.grad, self.shard_grad]

    def _state_tensors(self) -> list[torch.Tensor]:
        # the AdamW state's tensors are views of these three
        return [self.master, self.exp_avg, self.exp_avg_sq]

    # saving and resuming: this rank's shard

    def _adam_steps(self) -> list[torch.Tensor]:
        return [state["step"] for state in self.optimizer.state.values()]

    @torch.no_grad()
    def state_dict(self, copy: bool = True) -> dict:
        """This rank's shard: the master and both moments (flat, in the layout's shard order), the
        layout they belong to (`sharding`, with the world size), the step counts."""
        self.wait_onloaded()

        def saved(t: torch.Tensor) -> torch.Tensor:
            return self._resident(t).detach().to("cpu", copy=True) if copy else self._resident(t).detach()

        steps = self._adam_steps()
        return dict(layout=self._layout(), sharding={**self.layout.describe(), "rank": self.world.rank},
                    master=saved(self.master), exp_avg=[saved(self.exp_avg)], exp_avg_sq=[saved(self.exp_avg_sq)],
                    adam_step=[float(steps[0])] if steps else [0.0], steps=self.steps, skipped=self.skipped)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's state_dict() (every rank at once: the parameters are all-gathered).
        A shard of another world size or bucketing cannot be placed here: ValueError."""
        sharding, mine = state.get("sharding"), {**self.layout.describe(), "rank": self.world.rank}
        if sharding != mine:
            there = (f"rank {sharding['rank']} of {sharding['world_size']} with {len(sharding['buckets'])} gradient "
                     "buckets" if sharding else "one process")
            raise ValueError(f"the optimizer state was saved by {there}, and this is rank {self.world.rank} of "
                             f"{self.world.size} with {len(self.layout.buckets)}: resume with the world size "
                             "(torchrun --nnodes N --nproc-per-node G) and --distributed.bucket-mib it was saved with")
        self._check_layout(state["layout"])
        self.wait_onloaded()
        self._resident(self.master).copy_(state["master"])
        self._resident(self.exp_avg).copy_(state["exp_avg"][0])
        self._resident(self.exp_avg_sq).copy_(state["exp_avg_sq"][0])
        for step in self._adam_steps():
            step.fill_(state["adam_step"][0])
        self.steps, self.skipped = state["steps"], state["skipped"]
        self._write_model()
