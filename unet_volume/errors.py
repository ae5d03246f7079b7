"""The errors unet-volume raises on purpose.

Every message names the problem, the offending value and the fix, so the CLI can
print it as one line (exit code 2) and a library caller can show it as is. The
hierarchy follows zarr-python: each error is a ``UnetVolumeError`` and also the
builtin it resembles, so ``except ValueError`` keeps working for callers that do
not know our types.
"""

from __future__ import annotations


class UnetVolumeError(Exception):
    """Base of every error unet-volume raises deliberately."""


class InputError(UnetVolumeError, ValueError):
    """An input (volume, labels, option value) cannot be used as given."""


class GeometryError(InputError):
    """A shape does not fit the network or the block grid (e.g. an invalid tile size)."""


class CheckpointError(UnetVolumeError, ValueError):
    """A file is not a unet-volume checkpoint, or it is damaged."""


class OutputExistsError(UnetVolumeError, FileExistsError):
    """The output location already holds data and overwriting was not asked for."""


class BlockError(UnetVolumeError, RuntimeError):
    """A block task failed during a run; the message names the block."""


def is_transient(error: BaseException) -> bool:
    """Whether trying again may succeed: a dropped connection or a timeout, as object stores and
    network file systems have under load, but never an error we raised about the input itself.

    >>> is_transient(ConnectionResetError()), is_transient(InputError("bad shape"))
    (True, False)
    """
    return isinstance(error, ConnectionError | TimeoutError) and not isinstance(
        error, UnetVolumeError
    )
