"""Absolute Zero self-play: `python -m fastazr.train [--preset cpu|gpu] [--model M] [--steps N] [--out DIR]`.

Builds the model, the rollout engine on the model's own tensors, the policy update, the colocated
memory phases and the sandbox; then each step: propose -> validate -> solve -> check -> reward
-> advantage -> update -> log. `python -m fastazr.train --help` lists every option."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastazr.azr import SelfPlay, assign_advantages, assign_rewards, derived_seed
from fastazr.azr.report import console_line, game_metrics, write_samples
from fastazr.model import Decoder, Tokenizer, load
from fastazr.model.embedded import default_model_path
from fastazr.model.gguf_file import GGUFFile
from fastazr.options import TrainConfig, as_dict, parse_args
from fastazr.rollout import Engine
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor
from fastazr.update import ColocatedMemory, PolicyUpdate, Rollout, Telemetry

PHASES = ("generate_propose", "sandbox_validate", "generate_solve", "sandbox_check", "train", "swap", "other")
log = logging.getLogger("fastazr.train")


def text_tokenizer(tokenizer: Tokenizer | None, vocab_size: int) -> Tokenizer:
    """The model's tokenizer; a random-init preset has none and borrows the embedded model's,
    whose 49,152 ids are valid ids of every preset's vocabulary."""
    if tokenizer is not None:
        return tokenizer
    path = default_model_path()
    borrowed = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, str(path))
    if borrowed.vocab_size > vocab_size:
        raise ValueError(f"the model has no tokenizer and its vocabulary ({vocab_size}) is smaller than the "
                         f"embedded model's ({borrowed.vocab_size}): pass a checkpoint with tokenizer.json")
    return borrowed


@dataclass
class Trainer:
    """Everything a step uses, built once."""
    config: TrainConfig
    out: Path
    model: Decoder
    update: PolicyUpdate
    engine: Engine
    memory: ColocatedMemory
    telemetry: Telemetry
    sandbox: Sandbox
    game: SelfPlay

    def close(self) -> None:
        self.sandbox.close()
        self.telemetry.close()


def build(config: TrainConfig) -> Trainer:
    out = Path(config.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(as_dict(config), indent=2, default=str))
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(config.seed)
    model, tokenizer = load(config.model, device=device, seed=config.seed)
    tokenizer = text_tokenizer(tokenizer, model.config.vocab_size)
    update = PolicyUpdate(model, config.update)           # first: its fp32 master and gradients exist
    engine = Engine(model, tokenizer, config.engine, seed=derived_seed(config.seed, "engine"))
    telemetry = Telemetry(device)
    memory = ColocatedMemory(engine, update.optimizer, config.update, telemetry)
    sandbox = Sandbox(config=config.sandbox)
    game = SelfPlay(config.azr, engine, TaskExecutor(sandbox), tokenizer, config.seed)
    return Trainer(config, out, model, update, engine, memory, telemetry, sandbox, game)


def train_step(t: Trainer, step: int) -> dict[str, float]:
    """propose -> validate -> solve -> check -> reward -> advantage -> update -> log."""
    game, phase, started = t.game, t.telemetry.phase, time.perf_counter()
    with phase("other"):
        prompts = game.proposer_prompts(step)
    with phase("generate_propose"):
        proposals = game.generate(prompts, step, 0)
    with phase("sandbox_validate"):
        game.validate(proposals, step)
    with phase("other"):
        prompts = game.solver_prompts(proposals, step)
    with phase("generate_solve"):
        solves = game.generate(prompts, step, 1)
    with phase("sandbox_check"):
        game.check(solves)
    with phase("other"):
        rates = assign_rewards(proposals, solves, t.config.azr.rewards)
        trained = [s for s in proposals + solves if s.trained and s.completion_ids]
        reward_stds = assign_advantages(trained)
        rollouts = [Rollout(s.prompt_ids, s.completion_ids, s.advantage, s.logprobs) for s in trained]
    update_metrics = {}
    if rollouts:  # every response empty (say, every prompt too long): nothing to train on, no step
        with phase("swap"):
            t.memory.to_training()
        with phase("train"):
            update_metrics = t.update(rollouts)
        with phase("swap"):
            t.memory.to_generation()
    with phase("other"):
        metrics = {"step": step, **game_metrics(proposals, solves, rates, reward_stds, game.buffers.sizes()),
                   **update_metrics}
        write_samples(t.out / "samples" / f"step_{step}.jsonl", proposals + solves)
    metrics.update(timing(t.telemetry, time.perf_counter() - started, proposals + solves))
    with open(t.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    return metrics


def run(config: TrainConfig) -> Path:
    trainer = build(config)
    try:
        if config.azr.seed_tasks:
            rounds = trainer.game.seed_buffers()
            print(f"seeding: {rounds} proposal rounds, buffers {trainer.game.buffers.sizes()}", flush=True)
        for step in range(1, config.steps + 1):
            metrics = train_step(trainer, step)
            print(console_line(step, config.steps, metrics), flush=True)
    finally:
        trainer.close()
    return trainer.out


def timing(telemetry: Telemetry, seconds: float, samples) -> dict[str, float]:
    """time/<phase> for the step's phases, generated tokens/s over both generation phases, and
    peak memory: the GPU's allocated peak on CUDA, the process's resident peak always."""
    timeline = telemetry.timeline()
    m = {f"time/{p}": timeline.get(f"{p}/seconds", 0.0) for p in PHASES}
    m["time/step"] = seconds
    m["tokens/generate_propose"] = sum(len(s.completion_ids) for s in samples if s.role == "propose")
    m["tokens/generate_solve"] = sum(len(s.completion_ids) for s in samples if s.role == "solve")
    generated = m["tokens/generate_propose"] + m["tokens/generate_solve"]
    m["tokens_per_s"] = generated / max(m["time/generate_propose"] + m["time/generate_solve"], 1e-9)
    peaks = [v for k, v in timeline.items() if k.endswith("/peak_allocated_gib")]
    m["gpu_memory_gib"] = max(peaks, default=0.0)  # 0 on the CPU
    m["host_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return m


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_args(argv, torch.cuda.is_available())
    out = run(config)
    print(f"wrote {out / 'metrics.jsonl'} and {out / 'samples'}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
