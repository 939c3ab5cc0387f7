"""Errors a user can fix, importable without torch (the CLI reports them before loading it)."""


class DataError(ValueError):
    """A data problem the user can fix: one line naming the config field and the fix."""


class DeviceError(ValueError):
    """A device the trial asks for is not here (e.g. `device: cuda` on a host without CUDA)."""


class SchemeError(ValueError):
    """A scheme setting the trial's net or schedule cannot take, found once training has the net
    (e.g. IMP's `output_layer` on a net whose last layer is a conv): one line naming the field."""
