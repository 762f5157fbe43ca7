"""Checkpoint directories on disk: written whole or not at all, found again, verified, pruned.

    OUT/checkpoints/step_00000042/
        model/                  the policy as a Hugging Face directory (transformers loads it)
        optimizer.safetensors   fp32 master (when the model is not fp32) and AdamW's moments
        state.json              step, metrics position, buffers, RNG states, optimizer counters
        manifest.json           every file's size and CRC-32, written last

A checkpoint is built in a hidden sibling directory, every file fsynced, then renamed into place
and the parent directory fsynced: a crash, a kill -9 or a full disk leaves either the previous
checkpoints alone or a hidden directory that the next run deletes. At load the manifest is
checked file by file (size, then CRC-32), so a truncated or damaged checkpoint is reported and the
one before it is used.

CRC-32 (zlib) rather than a cryptographic hash: it detects truncation and torn writes, the
failures a checkpoint meets, at ~1-2 GB/s, where SHA-256 would double the time to save a 1.5B
model's 21 GB of weights and optimizer state."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"step_(\d{8})")
_CHUNK = 16 * 2**20
log = logging.getLogger("fastazr.checkpoint")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be written; the message says which and why."""


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sum_and_sync(path: Path) -> dict:
    entry = {"bytes": path.stat().st_size, "crc32": crc32(path)}
    _fsync(path)
    return entry


def write(root: Path, step: int, fill: Callable[[Path], dict | None]) -> Path:
    """Build checkpoint `step` under root: fill(directory) writes its files and may return the
    {"bytes", "crc32"} of those it summed while writing them (by path relative to directory);
    the others are summed here, every file is fsynced, the manifest written, and the directory
    renamed into place. On any error
    the partial directory is removed and CheckpointError says what failed; existing checkpoints
    are never touched."""
    final = root / f"step_{step:08d}"
    staging = root / f".step_{step:08d}.partial-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        sweep_partials(root)  # a killed writer's leftovers may be what fills the disk
        staging.mkdir()
        known = fill(staging) or {}
        names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())

        def summed(name: str) -> dict:
            path = staging / name
            if name not in known:
                return _sum_and_sync(path)
            if known[name]["bytes"] != path.stat().st_size:  # its writer's sum is of other bytes
                raise OSError(f"{name} has {path.stat().st_size} bytes on disk, its writer wrote {known[name]['bytes']}")
            _fsync(path)
            return known[name]

        # zlib and fsync release the GIL: summing one file while another reaches the disk
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="fastazr-checkpoint-sum") as pool:
            files = dict(zip(names, pool.map(summed, names)))
        manifest = staging / MANIFEST
        manifest.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
        _fsync(manifest)
        for directory in sorted({p.parent for p in staging.rglob("*")} | {staging}, key=lambda p: -len(p.parts)):
            _fsync(directory)
        old = None
        if final.exists():  # the same step written again: moved aside first, so one copy is always whole
            old = root / f".step_{step:08d}.replaced-{os.getpid()}"
            os.rename(final, old)
        os.rename(staging, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"writing checkpoint {final} failed ({reason}): the previous checkpoints are intact; "
                              f"free disk space or fix the permissions of {root}") from exc
    except BaseException:  # an interrupt: no half-written directory stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def verify(directory: Path) -> str | None:
    """None when the checkpoint is complete and undamaged, else what is wrong with it."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return f"format {manifest.get('format')!r}, this fastazr reads {FORMAT}"
        # valid JSON of another shape is as unreadable as a torn file: the older checkpoint is tried
        if not isinstance(files, dict) or not all(
                isinstance(name, str) and isinstance(entry, dict) and type(entry.get("bytes")) is int
                and type(entry.get("crc32")) is int for name, entry in files.items()):
            return "unreadable manifest.json (its files are not {name: {bytes, crc32}})"
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, expected in files.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
        if crc32(path) != expected["crc32"]:
            return f"{name} is damaged (CRC-32 differs from the manifest)"
    return None


def sweep_partials(root: Path) -> None:
    """Delete the partial and replaced directories of writers that are gone (killed mid-write)."""
    for partial in [*root.glob(".step_*.partial-*"), *root.glob(".step_*.replaced-*")]:
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def listed(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory under root, newest first, verified or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def newest(root: Path) -> Path:
    """The newest checkpoint that verifies; each newer one that does not is logged with why."""
    candidates = listed(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint under {root}: nothing to resume (start a new run without --resume)")
    for _, directory in candidates:
        problem = verify(directory)
        if problem is None:
            return directory
        log.warning("checkpoint %s is unusable: %s; trying the one before it", directory, problem)
    raise CheckpointError(f"none of the {len(candidates)} checkpoints under {root} is complete and undamaged "
                          "(see the warnings above): start a new run without --resume")


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (those with a manifest: summing every
    file again here would reread gigabytes each save), and partial directories of dead writers."""
    good = 0
    for _, directory in listed(root):
        if good < keep and (directory / MANIFEST).is_file():
            good += 1
            continue
        shutil.rmtree(directory, ignore_errors=True)
    sweep_partials(root)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own partial directories are never in flight when prune runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
