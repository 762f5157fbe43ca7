"""Processes of a data-parallel run on this machine, as torchrun would start them (gloo on CPU)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, size: int, port: int) -> dict[str, str]:
    """torchrun's environment for rank `rank` of `size` on one node (without its agent)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(size),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(size)}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a run of the real program: the torch kernels (not Triton's
    interpreter, as users run it on CPU), no torchrun variables inherited."""
    drop = ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}
