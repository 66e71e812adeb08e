"""Exceptions that every layer of the package raises (kept apart so that none imports another for them)."""


class Cancelled(Exception):
    """Raised when a long operation is stopped through its `cancel` argument."""
