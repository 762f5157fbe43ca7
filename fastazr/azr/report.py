"""What a step reports: its metrics (one JSON object per step in metrics.jsonl), the record of
every sample (samples/step_<n>.jsonl) and the console line."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict

from .tasks import GROUPS, TASK_TYPES, InductionTask, Sample, Triplet


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def game_metrics(proposals: list[Sample], solves: list[Sample], rates: dict[int, float],
                 reward_stds: dict[tuple[str, str], float], buffer_sizes: dict[str, int]) -> dict[str, float]:
    """Per task type and role: valid rate, solver accuracy, rewards, advantage spread, learnability,
    response lengths, buffer sizes. Means over the trained samples of each group; a group with
    no samples reports 0 (and its count, n/<task>/<role>, says so). advantage_std is the spread of
    the group's advantages over its responses (one value each, not token-weighted): 0 when every
    reward of the group is equal, so the group teaches nothing this step; reward_std is the
    token-weighted spread of the rewards the advantages were whitened by."""
    m: dict[str, float] = {}
    trained = [s for s in proposals + solves if s.trained]
    for task in TASK_TYPES:
        proposed = [s for s in proposals if s.task == task]
        solved = [s for s in solves if s.task == task and s.trained]
        m[f"valid_rate/{task}"] = _mean([s.status == "valid" for s in proposed])
        m[f"accuracy/{task}"] = _mean([s.status == "correct" for s in solved])
        m[f"learnability/{task}"] = _mean([s.reward for k, s in enumerate(proposals) if s.task == task and k in rates])
        m[f"solve_rate/{task}"] = _mean([rates[k] for k, s in enumerate(proposals) if s.task == task and k in rates])
        m[f"buffer_size/{task}"] = buffer_sizes[task]
    for task, role in GROUPS:
        group = [s for s in trained if s.task == task and s.role == role]
        m[f"n/{task}/{role}"] = len(group)
        m[f"reward/{task}/{role}"] = _mean([s.reward for s in group])
        m[f"reward_std/{task}/{role}"] = reward_stds.get((task, role), 0.0)
        m[f"advantage_std/{task}/{role}"] = statistics.pstdev([s.advantage for s in group]) if group else 0.0
        m[f"response_tokens/{task}/{role}"] = _mean([len(s.completion_ids) for s in group])
    for status in ("valid", "invalid", "duplicate", "malformed"):
        m[f"proposals/{status}"] = sum(s.status == status for s in proposals)
    m["truncated"] = _mean([s.finish_reason in ("length", "prompt_too_long") for s in proposals + solves])
    return m


def _plain(value):
    if isinstance(value, (Triplet, InductionTask)):
        return asdict(value)
    return value


def sample_record(s: Sample) -> dict:
    details = {k: _plain(v) for k, v in s.details.items() if k not in ("task",)}
    return {"task": s.task, "role": s.role, "trained": s.trained, "status": s.status, "reason": s.reason,
            "reward": s.reward, "advantage": s.advantage, "finish_reason": s.finish_reason,
            "prompt_tokens": len(s.prompt_ids), "response_tokens": len(s.completion_ids), "response": s.text,
            **details}


def write_samples(path, samples: list[Sample]) -> None:
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(sample_record(s), default=str) + "\n")


def console_line(step: int, steps: int, m: dict[str, float]) -> str:
    """A compact block per step: per task type valid rate, accuracy and rewards, then time. A
    missing metric (no loss without a loss token, say) shows as '-'."""
    def v(key: str, spec: str) -> str:
        value = m.get(key)
        if not isinstance(value, (int, float)):
            return "-".rjust(int(spec.lstrip("+").split(".")[0] or 0))
        return format(value, spec)

    rows = [f"step {step}/{steps}  {v('time/step', '.1f')} s  {v('tokens_per_s', '.0f')} tok/s  "
            f"loss {v('loss', '+.4f')}"]
    rows.append(f"  {'task':<10} {'valid':>6} {'acc':>6} {'r_prop':>7} {'r_solve':>8} {'len_p':>6} {'len_s':>6} {'buffer':>7}")
    for task in TASK_TYPES:
        rows.append(f"  {task:<10} {v(f'valid_rate/{task}', '6.2f')} {v(f'accuracy/{task}', '6.2f')} "
                    f"{v(f'reward/{task}/propose', '+7.2f')} {v(f'reward/{task}/solve', '+8.2f')} "
                    f"{v(f'response_tokens/{task}/propose', '6.0f')} {v(f'response_tokens/{task}/solve', '6.0f')} "
                    f"{v(f'buffer_size/{task}', '7.0f')}")
    phases = "  ".join(f"{k[5:]} {value:.1f}" for k, value in m.items()
                       if k.startswith("time/") and k != "time/step" and isinstance(value, (int, float)))
    rows.append(f"  time (s): {phases}")
    return "\n".join(rows)
