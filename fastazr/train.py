"""Absolute Zero self-play: `python -m fastazr.train [--preset cpu|gpu] [--model M] [--steps N] [--out DIR]`.

Builds the model, the rollout engine on the model's own tensors, the policy update, the colocated
memory phases and the sandbox (or restores them from a checkpoint with --resume); then each step:
propose -> validate -> solve -> check -> reward -> advantage -> update -> log -> checkpoint.
`python -m fastazr.train --help` lists every option; `--config FILE` reads them from TOML."""

from __future__ import annotations

import dataclasses
import fcntl
import gc
import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from fastazr.azr import SelfPlay, assign_advantages, assign_rewards, derived_seed
from fastazr.azr.config import AZRConfig
from fastazr.azr.report import console_line, game_metrics, write_samples
from fastazr.azr.selfplay import Prompt
from fastazr.azr.tasks import Sample
from fastazr.distributed import DataParallelUpdate, World, shares, update_shares
from fastazr.distributed.cores import pin_local_cores
from fastazr.distributed.failures import Failures
from fastazr.distributed.gather import aggregate_timings, check_buffers, gather_samples
from fastazr.distributed.shards import ShardedCheckpointer, refusal, saved_world_size
from fastazr.eval.evaluate import EvalConfig, Evaluator
from fastazr.eval.humaneval import eval_sandbox_config
from fastazr.model import Decoder, Tokenizer, load
from fastazr.model.embedded import default_model_path
from fastazr.model.gguf_file import GGUFFile
from fastazr.options import TrainConfig, parse_args, save_config
from fastazr.rollout import Engine, RolloutBackend, SGLangBackend
from fastazr.runlog.board import Board
from fastazr.runlog import checkpoint
from fastazr.runlog.checkpoint import CheckpointError
from fastazr.runlog.run_state import Checkpointer, boundary, truncate_run_files
from fastazr.runlog.stop import Stopper, StopRequested
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor
from fastazr.update import ColocatedMemory, PolicyUpdate, Rollout, Telemetry

PHASES = ("generate_propose", "sandbox_validate", "generate_solve", "sandbox_check", "train", "swap", "checkpoint",
          "eval", "other")
SYNC = "sync"
"""A data-parallel run's own phase: gathering samples, waiting there for the slowest rank."""
SWAP_PARTS = ("release_kv", "swap_in_issue", "swap_out", "create_kv")
"""What the swap phase is made of (ColocatedMemory's telemetry phases)."""
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
    engine: RolloutBackend
    memory: ColocatedMemory
    telemetry: Telemetry
    sandbox: Sandbox
    game: SelfPlay
    checkpoints: Checkpointer
    board: Board | None
    start: int = 0
    """Steps already done (a resumed run's checkpoint step)."""
    stopper: Stopper | None = None
    evaluator: Evaluator | None = None
    """Built when --run.eval-every is set; its own sandbox (eval_sandbox) runs HumanEval's tests."""
    eval_sandbox: Sandbox | None = None
    lock: object = None
    """The open OUT/.lock file whose flock marks the run as taken (released when the process ends)."""
    updating: bool = False
    """From a step's update until its boundary is taken: the tensors are past the last boundary
    (or half-written), so no checkpoint of that boundary may be written from them."""
    world: World = dataclasses.field(default_factory=World)
    """This process's place in a data-parallel run (alone: rank 0 of 1)."""

    def close(self) -> None:
        gc.unfreeze()  # build() froze the heap; frozen objects are never freed, and bindings complain at exit
        self.checkpoints.wait()
        if self.board is not None:
            self.board.close()
        self.sandbox.close()
        if self.eval_sandbox is not None:
            self.eval_sandbox.close()
        self.telemetry.close()
        # last: SGLang's shutdown kills every child process of this one, the sandboxes' workers included
        self.engine.close()

    def check_stop(self) -> None:
        if self.stopper is not None:
            self.stop_requested()
            self.stopper.check()

    def stop_requested(self) -> bool:
        """Whether a stop signal came; in a data-parallel run, to any rank (all of them then stop
        at the same phase boundary: one that went on alone would wait in a collective forever)."""
        if self.stopper is None:
            return False
        if self.world.size > 1:
            self.stopper.signum = self.world.max(self.stopper.signum or 0) or None
        return self.stopper.signum is not None


class RunError(RuntimeError):
    """A run that cannot do what it is for with the options given; the message names the option."""


def eval_formats(azr: AZRConfig) -> tuple[str, ...]:
    """The formats evaluated during training: the one the run trains in (its prompts, prefilled
    with --azr.answer-prefill) and the plain instruction format."""
    return ("prefill" if azr.answer_prefill else "trainer", "plain")


def build(config: TrainConfig, world: World | None = None) -> Trainer:
    """world: this process's place in a data-parallel run, its process group started (default:
    alone). Every rank builds its own model, engine, update and sandbox; rank 0 alone holds the
    run's lock and writes its files."""
    world = world or World()
    out = Path(config.out)
    source = Path(config.resume) if config.resume else None
    resumed_from = None
    if source is None or source.resolve() != out.resolve():
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
            raise CheckpointError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    if source is not None:  # before anything slow is built, and before the run's config.toml changes
        resumed_from = checkpoint.newest(checkpoint.checkpoint_root(source))
        done = checkpoint_step(resumed_from)
        if saved_world_size(resumed_from) != world.size:
            raise CheckpointError(refusal(resumed_from, saved_world_size(resumed_from), world.size))
        if config.steps <= done:
            raise CheckpointError(f"{resumed_from} is at step {done} and --steps is {config.steps}: "
                                  f"pass --steps greater than {done} to continue")
    if world.leader:
        try:
            (out / "samples").mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission: before anything slow is built
            raise RunError(f"--out {out} cannot hold a run: {exc.strerror} ({exc.filename}); pick another --out") from None
    lock = hold_run_lock(out) if world.leader else None
    device = run_device(config, world)
    torch.manual_seed(config.seed)
    model, tokenizer = load(config.model, device=device, seed=config.seed)
    tokenizer = text_tokenizer(tokenizer, model.config.vocab_size)
    world.broadcast_parameters(model)
    # first: the fp32 master and gradients exist (in a data-parallel run, this rank's shard)
    update = (PolicyUpdate(model, config.update) if world.size == 1 else
              DataParallelUpdate(model, config.update, world, config.distributed))
    seed = derived_seed(config.seed, "engine")
    # SGLang starts inside ColocatedMemory, at its first resume_memory(): once the optimizer state
    # is off the GPU, so its KV pool (sized once, at its start) fits the generation phase
    engine = (SGLangBackend(model, tokenizer, config.sglang, seed=seed) if config.rollout == "sglang" else
              Engine(model, tokenizer, config.engine, seed=seed))
    telemetry = Telemetry(device)
    memory = ColocatedMemory(engine, update.optimizer, config.update, telemetry)
    sandbox = Sandbox(config=config.sandbox)
    game = SelfPlay(config.azr, engine, TaskExecutor(sandbox), tokenizer, config.seed,
                    progress_mode=config.run.progress if world.leader else "off")
    checkpoints = (Checkpointer(out, config.run.checkpoint_keep) if world.size == 1 else
                   ShardedCheckpointer(out, config.run.checkpoint_keep, world))
    trainer = Trainer(config, out, model, update, engine, memory, telemetry, sandbox, game, checkpoints, None,
                      lock=lock, world=world)
    if resumed_from is not None:
        trainer.start = checkpoints.restore(trainer, resumed_from)
        if world.leader:
            carry_run_files(source, out, trainer.start)
    if world.leader:  # rank 0 writes the run's files, evaluates and logs
        # as a new run: `--config OUT/config.toml` reproduces it, `--resume OUT` continues it; a
        # model given as a relative path is written absolute, so a resume from elsewhere finds it
        model_path = Path(config.model)
        saved = dataclasses.replace(config, resume=None,
                                    model=str(model_path.resolve()) if model_path.exists() else config.model)
        save_config(saved, out / "config.toml")
    if config.run.eval_every and world.leader:
        trainer.eval_sandbox = Sandbox(config=eval_sandbox_config(config.sandbox.workers))
        trainer.evaluator = Evaluator(engine, tokenizer, trainer.eval_sandbox, TaskExecutor(trainer.eval_sandbox),
                                      EvalConfig(formats=eval_formats(config.azr), limit=config.run.eval_limit,
                                                 max_tokens=config.run.eval_max_tokens, seed=config.seed,
                                                 template=game.template))
    if config.run.tensorboard and world.leader:
        trainer.board = Board(out / "tb", config.run.board_samples, purge_step=trainer.start + 1)
    # Everything built so far lives as long as the run: out of the garbage collector's sight, a
    # full collection (the memory phases run several a step, and Python's own thresholds more)
    # scans only what steps allocate, not torch's and the tokenizer's hundreds of thousands of objects.
    gc.collect()
    gc.freeze()
    return trainer


def run_device(config: TrainConfig, world: World) -> torch.device:
    """The CPU, or the GPU: in a data-parallel run, this rank's (its local rank's on its node)."""
    if not (config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    if world.size == 1:
        return torch.device("cuda")
    if world.local_size > torch.cuda.device_count():
        raise ValueError(f"{world.local_size} ranks on this node but {torch.cuda.device_count()} GPUs visible: "
                         "launch one process per GPU (torchrun --nproc-per-node), or --device cpu")
    return torch.device("cuda", world.local_rank)


def evaluate(t: Trainer, step: int) -> dict[str, float]:
    """The evaluation of this step's weights; out of memory, the step goes on without it
    (evaluation is optional, and the training state must not be blamed for it)."""
    try:
        metrics, records = t.evaluator.run(step)
    except torch.OutOfMemoryError as exc:
        log.warning("evaluation at step %d ran out of memory (%s): skipped; lower --run.eval-max-tokens or "
                    "--engine.kv-memory-fraction", step, str(exc).splitlines()[0] if str(exc) else "")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {}
    write_records(t.out / "eval" / f"step_{step}.jsonl", records)
    return metrics


def write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")


def checkpoint_step(directory: Path) -> int:
    return json.loads((directory / "state.json").read_text())["step"]


def hold_run_lock(out: Path):
    """An exclusive lock on OUT/.lock for the process's life: two trainers writing one run (a
    scheduler restarting a job whose first process still lives) would interleave checkpoints
    and metrics."""
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CheckpointError(f"another process is training into {out} (it holds {out / '.lock'}): stop it first, "
                              "or pick another --out") from None
    return handle


def carry_run_files(source: Path, out: Path, step: int) -> None:
    """A resumed run's metrics and samples up to its checkpoint, in its (new or same) directory."""
    if source.resolve() != out.resolve():
        (out / "eval").mkdir(exist_ok=True)
        for name in ["metrics.jsonl"] + [f"{kind}/step_{n}.jsonl" for kind in ("samples", "eval")
                                         for n in range(1, step + 1)]:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    truncate_run_files(out, step)


def share(world: World, prompts: list[Prompt]) -> list[int]:
    """The prompts this rank generates (all of them alone), balanced by their sample counts."""
    return shares([p.n for p in prompts], world.size)[world.rank]


def propose(t: Trainer, step: int) -> list[Sample]:
    """The step's proposals, validated, the valid ones in the buffers. In a data-parallel run each
    rank generates and validates its share, and every rank ends with all of them, in order."""
    game, phase = t.game, t.telemetry.phase
    with phase("other"):
        prompts = game.proposer_prompts(step)
        mine = share(t.world, prompts)
    with phase("generate_propose"):
        proposals = game.generate(prompts, step, 0, mine)
    with phase("sandbox_validate"):
        game.execute(proposals, step)
    with phase(SYNC):
        proposals = gather_samples(t.world, proposals, mine, prompts)
    with phase("other"):
        game.admit(proposals)  # in the batch's order on every rank: identical buffers
    return proposals


def train_step(t: Trainer, step: int) -> dict[str, float]:
    """propose -> validate -> solve -> check -> reward -> advantage -> update -> log. In a
    data-parallel run each rank generates and checks its share of both batches and trains on its
    share of the rollouts; everything else every rank computes alike, on the gathered batch."""
    game, world, phase, started = t.game, t.world, t.telemetry.phase, time.perf_counter()
    proposals = propose(t, step)
    if proposals and all(s.finish_reason == "prompt_too_long" for s in proposals):
        option, value = (("--sglang.context-length", t.config.sglang.context_length) if t.config.rollout == "sglang"
                         else ("--engine.max-model-len", t.config.engine.max_model_len))
        context = f"{option} {value}" if value is not None else f"{option} unset: the model's positions"
        message = (f"step {step}: every proposer prompt is longer than the model's context ({context}), so "
                   f"nothing can be generated or trained: raise {option} or lower --azr.references")
        if step == t.start + 1:  # the first step of the run (or of its resumption): the options, not the buffers
            raise RunError(message)
        log.warning("%s; the step goes on without an update", message)
    with phase("other"):
        prompts = game.solver_prompts(proposals, step)
        mine = share(world, prompts)
    t.check_stop()
    with phase("generate_solve"):
        solves = game.generate(prompts, step, 1, mine)
    t.check_stop()
    with phase("sandbox_check"):
        game.check(solves)
    with phase(SYNC):
        solves = gather_samples(world, solves, mine, prompts)
    with phase("other"):
        rates = assign_rewards(proposals, solves, t.config.azr.rewards)
        trained = [s for s in proposals + solves if s.trained and s.completion_ids]
        reward_stds = assign_advantages(trained)  # over the (task, role) groups of the whole batch
        rollouts = [Rollout(s.prompt_ids, s.completion_ids, s.advantage, s.logprobs) for s in trained]
    t.check_stop()
    with phase("checkpoint"):
        t.checkpoints.wait()  # the last checkpoint's tensors are on disk before the update changes them
    update_metrics = {}
    if rollouts:  # every response empty (say, every prompt too long): nothing to train on, no step
        t.updating = True
        with phase("swap"):
            t.memory.to_training()
        with phase("train"):  # on this rank's share of each mini-batch (alone: all of it)
            update_metrics = t.update(*update_shares(rollouts, t.config.update.mini_batches, world.rank, world.size))
        with phase("swap"):
            t.memory.to_generation()
    evaluated = {}
    if t.evaluator is not None and (step % t.config.run.eval_every == 0 or step == t.config.steps):
        with phase("eval"):
            evaluated = evaluate(t, step)
    with phase("other"):
        metrics = {"step": step, **game_metrics(proposals, solves, rates, reward_stds, game.buffers.sizes()),
                   **update_metrics, **{f"eval/{k}": v for k, v in evaluated.items()}}
        if world.leader:
            write_samples(t.out / "samples" / f"step_{step}.jsonl", proposals + solves)
        if world.size > 1 and t.config.distributed.check_buffers:
            check_buffers(world, game.buffers, step)
    metrics.update(timing(t.telemetry, time.perf_counter() - started, proposals + solves, world))
    if world.leader:
        with open(t.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    if t.board is not None:
        t.board.step(step, metrics, proposals + solves)
    return metrics


def run(config: TrainConfig, world: World | None = None) -> Path:
    """Train config.steps steps (continuing a resumed run's count), checkpointing every
    run.checkpoint_every steps and at the end. SIGINT/SIGTERM stop at the next phase boundary
    with a checkpoint (fastazr/runlog/stop.py); the process then exits with 128 + the signal.
    run.max_minutes ends the run early, checkpointed, when the next step would not fit. In a
    data-parallel run (world), every rank runs this loop and takes every decision alike."""
    started = time.monotonic()
    trainer = build(config, world)
    world = trainer.world
    every, budget = config.run.checkpoint_every, config.run.max_minutes * 60
    out_of_time, longest_step_s = False, 0.0
    with Stopper() as stopper:
        trainer.stopper = stopper
        try:
            if config.azr.seed_tasks and not config.resume:  # a resumed run's buffers are the checkpoint's
                rounds = trainer.game.seed_buffers(propose=lambda s: propose(trainer, s))
                trainer.telemetry.timeline()  # seeding's phases are no step's
                if world.leader:
                    print(f"seeding: {rounds} proposal rounds, buffers {trainer.game.buffers.sizes()}", flush=True)
            at = boundary(trainer, trainer.start)
            for step in range(trainer.start + 1, config.steps + 1):
                if budget and world.any(time.monotonic() - started + longest_step_s > budget):
                    out_of_time = True
                    break
                try:
                    metrics = train_step(trainer, step)
                except StopRequested:
                    break  # the step is abandoned before its update: `at` is still the state
                except torch.OutOfMemoryError as exc:
                    if world.size > 1:
                        raise  # the other ranks are elsewhere in the step: no checkpoint (main() says so)
                    saved = not trainer.updating
                    if saved:
                        trainer.checkpoints.save(trainer, at, background=False)
                    raise SystemExit(out_of_memory_message(exc, at.step, saved)) from None
                if world.leader:
                    print(console_line(step, config.steps, metrics), flush=True)
                longest_step_s = max(longest_step_s, metrics["time/step"])  # an evaluating step is longer
                at = boundary(trainer, step)
                trainer.updating = False  # the tensors are `at`'s again: a checkpoint of them is consistent
                if trainer.stop_requested():
                    break
                if step == config.steps or (every and step % every == 0):
                    trainer.checkpoints.save(trainer, at, background=step != config.steps)
            stopped = trainer.stop_requested()
            if stopped or out_of_time:
                trainer.checkpoints.save(trainer, at, background=False)  # nothing new if this step is saved
            if out_of_time and world.leader:
                print(f"--run.max-minutes {config.run.max_minutes:g} reached after step {at.step}; continue with "
                      f"--resume {trainer.out}", file=sys.stderr, flush=True)
            if stopped and at.step < config.steps:
                if world.leader:
                    print(f"stopped after step {at.step}; continue with --resume {trainer.out}", file=sys.stderr,
                          flush=True)
                raise SystemExit(stopper.exit_status)
        finally:
            trainer.close()
    return trainer.out


def out_of_memory_message(exc: BaseException, step: int | None, saved: bool) -> str:
    """What ran out, what was saved, and the options that give each phase less memory. step is
    the last complete step (None: outside the loop, while building or between steps)."""
    first = (str(exc) or "torch.OutOfMemoryError").splitlines()[0]
    if step is None:
        when, where = "", "No checkpoint was written by this error (the newest periodic one stands)"
    else:
        when = f" in step {step + 1}"
        where = (f"A checkpoint of step {step} was written" if saved else
                 "It happened inside the update, whose tensors cannot be saved half-written: the newest periodic "
                 "checkpoint stands")
    return (f"fastazr: out of memory{when} ({first}). {where}; resume with --resume and less memory "
            "per phase: --engine.kv-memory-fraction (generation: a smaller KV cache leaves room for activations), "
            "--engine.max-num-seqs, --update.micro-batch-tokens (training), or --azr.batch-size.")


def timing(telemetry: Telemetry, seconds: float, samples, world: World) -> dict[str, float]:
    """time/<phase> for the step's phases, generated tokens/s over both generation phases, and
    peak memory: the GPU's allocated peak on CUDA, the process's resident peak always. In a
    data-parallel run, every rank's aggregated (the slowest rank's phases, their means beside:
    fastazr.distributed.gather.aggregate_timings), with the time spent gathering (time/sync)."""
    timeline = telemetry.timeline()
    m = {f"time/{p}": timeline.get(f"{p}/seconds", 0.0) for p in PHASES + ((SYNC,) if world.size > 1 else ())}
    m["time/step"] = seconds
    m["tokens/generate_propose"] = sum(len(s.completion_ids) for s in samples if s.role == "propose")
    m["tokens/generate_solve"] = sum(len(s.completion_ids) for s in samples if s.role == "solve")
    generated = m["tokens/generate_propose"] + m["tokens/generate_solve"]
    m["tokens_per_s"] = generated / max(m["time/generate_propose"] + m["time/generate_solve"], 1e-9)
    for part in SWAP_PARTS:
        m[f"swap/{part}_s"] = timeline.get(f"{part}/seconds", 0.0)
    peaks = [v for k, v in timeline.items() if k.endswith("/peak_allocated_gib")]
    m["gpu_memory_gib"] = max(peaks, default=0.0)  # 0 on the CPU
    m["host_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return m if world.size == 1 else aggregate_timings(world.all_gather_object(m))


@record  # under torchrun, the failing rank's error and traceback go into its summary (nothing alone)
def main(argv: list[str] | None = None) -> int:
    """One process, or under torchrun one rank of a data-parallel run (docs/distributed.md)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        world = World.from_env()  # torchrun's environment; without it, alone: no process group
        # before the options are read: --sandbox.workers defaults to the cores this process may use
        pin_local_cores(world.local_rank, world.local_size)
    except ValueError as exc:
        print(f"fastazr: {exc}", file=sys.stderr)
        return 2
    config = parse_args(argv, torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():  # before the run directory is made
        print(f"fastazr: --device cuda (preset {config.preset}), but torch {torch.__version__} sees no CUDA device "
              "here: pass --device cpu or --preset cpu, or install a CUDA build of torch", file=sys.stderr)
        return 2
    if world.size > 1:
        if config.rollout != "embedded":
            print(f"fastazr: --rollout {config.rollout} runs in one process only: a data-parallel run gives each "
                  "rank the embedded engine (--rollout embedded)", file=sys.stderr)
            return 2
        if not world.leader:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs the run
        world.start(run_device(config, world), config.distributed.timeout_s)
    try:
        with Failures(world):
            out = run(config, world)
    except (CheckpointError, RunError) as exc:
        print(f"fastazr: {exc}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as exc:  # outside a step: building, or the KV cache after an update
        print(out_of_memory_message(exc, None, saved=False), file=sys.stderr)
        return 1
    world.close()  # after a failure it is left to the process's exit: a collective may still hang in it
    if world.leader:
        print(f"wrote {out / 'metrics.jsonl'} and {out / 'samples'}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
