"""Errors raised while building, loading or saving a model: each says what was wrong and what to change."""


class ModelError(ValueError):
    """A model, checkpoint or tokenizer that fastazr cannot use as given."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A path that does not exist, or a directory without the files a checkpoint needs."""
