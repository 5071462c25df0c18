"""Errors the command line reports without a traceback, importable without torch (the operator's image
has none)."""


class ModelError(ValueError):
    """A model path or file that cannot be used; the message says why."""
