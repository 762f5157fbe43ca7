"""What a run keeps and shows: checkpoints and resume, TensorBoard, progress bars."""

from .config import RunConfig

__all__ = ["RunConfig"]
