"""The Absolute Zero game: task types and roles, prompts, parsing of responses, task buffers,
rewards, Task-Relative REINFORCE++ advantages, and the batched self-play step. Nothing here runs
a model: the step is given a RolloutBackend and a TaskExecutor."""

from .config import AZRConfig
from .rewards import RewardScale
from .selfplay import SelfPlay, assign_advantages, assign_rewards, derived_seed
from .tasks import GROUPS, ROLES, TASK_TYPES, InductionTask, Sample, Triplet

__all__ = ["AZRConfig", "GROUPS", "InductionTask", "ROLES", "RewardScale", "Sample", "SelfPlay", "TASK_TYPES",
           "Triplet", "assign_advantages", "assign_rewards", "derived_seed"]
