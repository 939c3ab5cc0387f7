"""Errors a user can fix, importable without torch (the CLI reports them before loading it)."""


class DataError(ValueError):
    """A data problem the user can fix: one line naming the config field and the fix."""
