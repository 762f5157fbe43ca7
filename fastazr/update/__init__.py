"""The policy update and the memory phases around it (separate from the Absolute Zero logic)."""

from .config import UpdateConfig
from .memory import ColocatedMemory
from .optimizer import MasterOptimizer
from .policy_update import PolicyUpdate
from .rollouts import MicroBatch, Rollout, build_micro_batch, plan_micro_batches
from .telemetry import Telemetry

__all__ = ["UpdateConfig", "ColocatedMemory", "MasterOptimizer", "PolicyUpdate", "MicroBatch", "Rollout",
           "build_micro_batch", "plan_micro_batches", "Telemetry"]
