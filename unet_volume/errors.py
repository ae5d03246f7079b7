"""The errors unet-volume raises on purpose.

Every message names the problem, the offending value and the fix, so the CLI can
print it as one line (exit code 2) and a library caller can show it as is. The
hierarchy follows zarr-python: each error is a ``UnetVolumeError`` and also the
builtin it resembles, so ``except ValueError`` keeps working for callers that do
not know our types.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ETIMEDOUT})
"""I/O errors worth another try: busy or flaky storage, not a missing file or a full disk."""
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses a store answers when it is overloaded or failing for a moment (503: SlowDown)."""
TRANSIENT_CLIENT_ERRORS = frozenset(
    {
        "ClientConnectionError",  # aiohttp (fsspec's HTTP): refused, reset, server disconnected
        "ClientPayloadError",  # aiohttp: a body cut short
        "HTTPClientError",  # botocore (s3fs): connection closed, read timeout, endpoint down
        "IncompleteReadError",
    }
)
"""Exception types (by name: their libraries are optional) of a connection that failed."""
UNWRITABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
"""I/O errors that say the output cannot take more data until someone acts: full, read-only."""


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
    """Tasks failed during a run; the message names them, ``failures`` holds them.

    ``failures`` is a list of ``(item, exception)``: the region (or other task input) and
    what it raised, for callers that record them.
    """

    def __init__(
        self,
        failures: Sequence[tuple[object, BaseException]],
        *,
        names: list[str] | None = None,
        message: str | None = None,
    ):
        self.failures = list(failures)
        names = names or [str(item) for item, _ in failures]
        if message is not None:
            pass
        elif len(failures) == 1:
            message = f"task {names[0]} failed: {failures[0][1]}"
        else:
            shown = "; ".join(f"{n}: {error}" for n, (_, error) in zip(names[:3], failures))
            more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
            message = f"{len(failures)} tasks failed: {shown}{more}"
        super().__init__(message)


class StorageError(UnetVolumeError, OSError):
    """The output cannot be written (a full disk, a read-only or forbidden location)."""


def is_unwritable(error: BaseException) -> bool:
    """Whether ``error`` says the output's storage refuses writes (full, read-only, forbidden).

    >>> import errno; is_unwritable(OSError(errno.ENOSPC, "No space left on device"))
    True
    """
    return (
        isinstance(error, OSError)
        and not isinstance(error, UnetVolumeError)
        and error.errno in UNWRITABLE_ERRNOS
    )


class StallError(UnetVolumeError, TimeoutError):
    """No task finished for far longer than tasks take; the message names those in flight."""


def is_transient(error: BaseException) -> bool:
    """Whether trying again may succeed: a dropped connection, a timeout or a busy device, as
    object stores and network file systems have under load, but never an error we raised
    about the input itself.

    >>> is_transient(ConnectionResetError()), is_transient(InputError("bad shape"))
    (True, False)
    """
    if isinstance(error, UnetVolumeError):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if getattr(error, "status", None) in RETRY_STATUSES:  # aiohttp's ClientResponseError
        return True
    if any(kind.__name__ in TRANSIENT_CLIENT_ERRORS for kind in type(error).__mro__):
        return True
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS
