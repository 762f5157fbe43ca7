"""A run's state at a step boundary, saved as a checkpoint and restored into a freshly built trainer.

What makes a resumed run continue exactly: the fp32 master and AdamW's moments and counters (the
model's weights are rewritten from the master, as every step does), the task buffers in order,
every RNG (Python, numpy, torch CPU and CUDA, the engine's stream of seeds for unseeded requests)
and the step. Every other random choice of a step derives from (seed, step, purpose), so nothing
else carries over.

Saving costs the step almost nothing: the host-side state (buffers, RNG) is captured when the step
begins, the tensors are written by a background thread while the next step generates (generation
only reads the weights and leaves the optimizer state alone), and the next update waits for the
write before it changes them."""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fastazr.azr.buffers import TaskBuffers
from fastazr.model import load_hf, save_hf
from fastazr.model.safetensors_stream import PinnedStaging, write_safetensors

from . import checkpoint

log = logging.getLogger("fastazr.checkpoint")


@dataclass
class Boundary:
    """The host-side state when `step` steps are complete, taken before step + 1 changes it."""
    step: int
    buffers: dict
    rng: dict
    engine_seeds: tuple


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_random_state(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            log.warning("the checkpoint holds the RNG states of %d GPUs, this machine has %d: CUDA RNGs start fresh",
                        len(saved), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all([_tensor(s) for s in saved])


def boundary(trainer, step: int) -> Boundary:
    return Boundary(step, trainer.game.buffers.snapshot(), rng_state(), trainer.engine.seed_state())


def _optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    tensors = {"master": state["master"]}
    for k, (avg, sq) in enumerate(zip(state["exp_avg"], state["exp_avg_sq"])):
        tensors[f"exp_avg.{k}"], tensors[f"exp_avg_sq.{k}"] = avg, sq
    return tensors


class Checkpointer:
    """Writes checkpoints of a trainer under OUT/checkpoints, one at a time, keeping the newest
    `keep`; restores the newest good one."""

    def __init__(self, out: Path, keep: int):
        self.root = checkpoint.checkpoint_root(out)
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pinned: PinnedStaging | None = None
        self.saved_step: int | None = None
        """The step of the newest checkpoint on disk that this run wrote or resumed from."""

    def save(self, trainer, at: Boundary, background: bool = True) -> None:
        """Checkpoint the trainer as of `at` (its tensors must not have changed since). In the
        background the next wait() reports a failure; in the foreground it raises CheckpointError."""
        self.wait()
        if at.step == self.saved_step:
            return
        optimizer = trainer.update.state_dict(copy=False)
        meta = {k: v for k, v in optimizer.items() if k not in ("master", "exp_avg", "exp_avg_sq")}
        tensors = _optimizer_tensors(optimizer)
        if trainer.model.dtype == torch.float32:
            del tensors["master"]  # the fp32 master is the model's weights, already in model/: 4 bytes a parameter less
        state = {"step": at.step, "rng": at.rng, "engine_seeds": at.engine_seeds, "optimizer": meta,
                 "model": trainer.config.model}
        ready = None
        if trainer.model.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()  # the update's last writes, seen by the writer's own stream

        staging = self._staging(trainer.model.device)

        def fill(directory: Path) -> dict:
            if staging is not None:
                staging.wait(ready)
            weights = {}

            def optimizer() -> dict:
                return write_safetensors(directory / "optimizer.safetensors", tensors, staging=staging)

            def model() -> None:
                save_hf(trainer.model, directory / "model", trainer.game.tokenizer, staging=staging, sums=weights)

            if staging is None:  # on the CPU summing and copying into the page cache are CPU work: side by side
                with ThreadPoolExecutor(max_workers=1) as pool:
                    pending = pool.submit(optimizer)
                    model()
                    written = pending.result()
            else:  # GPU tensors take turns on the one pair of pinned buffers; the copy engine and disk bound them
                model()
                written = optimizer()
            sums = {f"model/{name}": entry for name, entry in weights.items()}
            sums["optimizer.safetensors"] = written
            (directory / "state.json").write_text(json.dumps({**state, "buffers": TaskBuffers.state(at.buffers)}))
            return sums

        def work() -> None:
            try:
                self._commit(at.step, fill)
            except BaseException as exc:  # reported by wait() on the training thread
                self._error = exc

        self._launch(work, background)

    def _commit(self, step: int, fill) -> Path:
        """Write checkpoint `step` (fill writes its files), then prune the older ones."""
        started = time.perf_counter()
        path = checkpoint.write(self.root, step, fill)
        self.saved_step = step
        checkpoint.prune(self.root, self.keep)
        log.info("checkpoint %s written in %.1f s", path, time.perf_counter() - started)
        return path

    def _launch(self, work, background: bool) -> None:
        """Run a save's work on the writer thread, or now (then its error is raised here)."""
        if background:
            self._thread = threading.Thread(target=work, name="fastazr-checkpoint", daemon=True)
            self._thread.start()
        else:
            work()
            self._raise()

    def _staging(self, device: torch.device) -> PinnedStaging | None:
        """The pinned chunk buffers GPU tensors cross to the host through, made once per run."""
        if device.type != "cuda":
            return None
        if self._pinned is None or self._pinned.device != device:
            self._pinned = PinnedStaging(device)
        return self._pinned

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; a failed background write is
        logged and training goes on (the previous checkpoint is intact, the next save retries)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            log.error("%s", error)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def restore(self, trainer, directory: Path) -> int:
        """Load a checkpoint (checkpoint.newest() found and verified it) into the trainer; returns
        its step. Newer checkpoint directories beside it failed verification: they are deleted,
        or pruning would keep them and delete good ones."""
        self._drop_newer(directory)
        try:
            state = json.loads((directory / "state.json").read_text())
            tensors = load_file(directory / "optimizer.safetensors")
        except (OSError, ValueError) as exc:
            raise checkpoint.CheckpointError(f"checkpoint {directory} passed its manifest check but cannot be "
                                             f"read ({exc})") from exc
        groups = len(state["optimizer"]["adam_step"])
        master = tensors["master"] if "master" in tensors else _master_from_model(directory / "model", state)
        optimizer = {**state["optimizer"], "master": master,
                     "exp_avg": [tensors[f"exp_avg.{k}"] for k in range(groups)],
                     "exp_avg_sq": [tensors[f"exp_avg_sq.{k}"] for k in range(groups)]}
        try:
            trainer.update.load_state_dict(optimizer)
        except ValueError as exc:  # another model's shapes
            raise checkpoint.CheckpointError(f"{directory} is a checkpoint of {state['model']!r}, which does not fit "
                                             f"--model {trainer.config.model!r}: {exc}") from None
        return self._resume(trainer, state, directory)

    @staticmethod
    def _drop_newer(directory: Path) -> None:
        """Delete the checkpoint directories newer than `directory` (they failed verification)."""
        for step, newer in checkpoint.listed(directory.parent):
            if newer != directory and step > int(directory.name.removeprefix("step_")):
                log.warning("deleting %s: it failed verification and the run continues from %s", newer, directory)
                shutil.rmtree(newer, ignore_errors=True)

    def _resume(self, trainer, state: dict, directory: Path) -> int:
        """The rest of the run's state (the weights are loaded): buffers, RNGs; returns the step."""
        trainer.engine.weights_updated()
        trainer.game.buffers.load_state(state["buffers"])
        set_rng_state(state["rng"])
        trainer.engine.set_seed_state(_random_state(state["engine_seeds"]))
        log.info("resumed from %s (step %d)", directory, state["step"])
        self.saved_step = state["step"]
        return state["step"]


def _master_from_model(directory: Path, state: dict) -> torch.Tensor:
    """The flat fp32 master of an fp32 model's checkpoint, which saves it once, as model/."""
    weights = dict(load_hf(directory, "cpu", torch.float32).named_parameters())
    return torch.cat([weights[name].detach().reshape(-1) for name, _ in state["optimizer"]["layout"]])


def _random_state(saved: list) -> tuple:
    """random.Random.getstate() after a JSON round trip (lists back to tuples)."""
    version, keys, gauss = saved
    return version, tuple(keys), gauss


def truncate_run_files(out: Path, step: int) -> None:
    """Forget what a run wrote after checkpoint `step`: later metrics lines (and a partial last
    line) and later steps' sample and evaluation files, which the resumed run writes again."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        metrics.write_text("".join(line + "\n" for line in kept))
    for path in [*(out / "samples").glob("step_*.jsonl"), *(out / "eval").glob("step_*.jsonl")]:
        number = path.stem.removeprefix("step_")
        if number.lstrip("-").isdigit() and int(number) > step:
            path.unlink()
