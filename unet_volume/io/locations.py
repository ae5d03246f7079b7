"""Where data lives: paths and fsspec URLs, checked, made absolute, tested, removed.

Every input and output is named by a local path or an fsspec URL (``s3://...``). Workers
resolve relative paths against their own working directory, so URLs go to them absolute
(:func:`absolute`); parameters from afar are checked before anything opens them
(:func:`check_location`); storage calls that fail for a moment are tried again
(:func:`with_retries`). :mod:`unet_volume.io.volumes` reads volumes at these locations.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import zarr

from unet_volume.errors import InputError, is_transient
from unet_volume.io.retries import count, fault_kind

T = TypeVar("T")
log = logging.getLogger(__name__)


def absolute(url: str | Path) -> str:
    """``url`` with a local path made absolute; URLs (``s3://...``) as they are.

    Dask workers resolve relative paths against their own working directory, which on a
    cluster (or a scheduler started elsewhere) is not the caller's.

    >>> absolute("s3://bucket/v.zarr"), absolute("/data/v.zarr")
    ('s3://bucket/v.zarr', '/data/v.zarr')
    """
    url = str(url)
    return url if "://" in url else str(Path(url).expanduser().absolute())


def check_location(value: object, what: str) -> str:
    """``value`` if it can name a local path or an fsspec URL; for parameters from afar.

    Flow parameters come from the Prefect UI, an API call or a deployment file, not from the
    user's own shell: refused are a value that is not a string, an empty one, one holding
    control characters (a newline or NUL smuggled into a path), and a URL whose protocol no
    installed fsspec filesystem reads. Nothing is ever passed to a shell.

    >>> check_location("memory://volume.zarr", "image")
    'memory://volume.zarr'
    """
    if not isinstance(value, str) or not value.strip():
        raise InputError(
            f"{what} {value!r} is not a path; pass a local path or an fsspec URL such as "
            "s3://bucket/volume.zarr"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InputError(f"{what} {value!r} holds control characters; pass a plain path or URL")
    protocol = value.split("://", 1)[0] if "://" in value else None
    if protocol is not None:
        check_no_credentials(value, what)
        try:
            fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InputError(
                f"{what} {value!r} uses {protocol}://, which no installed filesystem reads "
                f"({reason}); pass a local path, or install the fsspec filesystem for it"
            ) from error
    return value


SECRET_IN_URL = re.compile(
    r"^(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:]*):(?P<password>[^/@]*)@"
    r"|[?&](?P<signed>X-Amz-Signature|X-Amz-Credential|X-Goog-Signature|Signature|sig)=",
    re.IGNORECASE,
)
"""A password in a URL's user part (``s3://KEY:SECRET@bucket``, ``https://user:pw@host``), or
the signature of a pre-signed or shared-access URL."""


def check_no_credentials(url: str, what: str) -> str:
    """``url`` unless it carries credentials, which would then be written wherever the URL is:
    the output's attributes, run records, logs, Prefect's database.

    The error line masks the secret. Credentials go the standard way instead: AWS_* variables,
    the AWS config files, or ``storage_options`` in a cluster spec.

    >>> check_no_credentials("s3://bucket/v.zarr", "image")
    's3://bucket/v.zarr'
    """
    found = SECRET_IN_URL.search(url)
    if found is None:
        return url
    if found["password"] is not None:
        shown = f"{found['scheme']}{found['user']}:***@{url[found.end() :]}"
    else:
        shown = url.split("?", 1)[0] + "?..."
    raise InputError(
        f"{what} {shown} holds credentials in the URL, which would be written with it; "
        "pass the plain URL and the credentials the standard way (AWS_* variables, "
        "~/.aws/credentials, or storage_options in a cluster spec)"
    )


def access_denied(url: str, error: BaseException) -> InputError | None:
    """The one-line error for a store's refusal (HTTP 403, a file's permissions) of ``url``,
    or None where ``error`` is something else. Permanent: it is never retried."""
    if not isinstance(error, PermissionError) and getattr(error, "status", None) != 403:
        return None
    reason = str(error).splitlines()[0] if str(error) else "403"
    if str(url).startswith(("http://", "https://")):
        check = (
            "check that the web server lets this machine read it (its access rules, or the "
            "headers it asks for, as storage_options in a cluster spec)"
        )
    else:
        check = (
            "check the credentials (AWS_* variables, ~/.aws/credentials, storage_options in a "
            "cluster spec) and that they may read it (the bucket's policy; a local file's "
            "permissions)"
        )
    return InputError(f"{url}: access denied ({type(error).__name__}: {reason}); {check}")


def remove_output(url: str) -> None:
    """Delete whatever is stored at ``url`` (nothing if it does not exist)."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def is_remote(url: str | Path) -> bool:
    """Whether ``url`` names an object store or other remote filesystem, not a local path.

    >>> is_remote("s3://bucket/m.pt"), is_remote("/data/m.pt"), is_remote("file:///data/m.pt")
    (True, False, False)
    """
    return "://" in str(url) and not str(url).startswith("file://")


def location(url: str | os.PathLike[str]) -> Path | str:
    """``url`` as a :class:`~pathlib.Path` where it is local, else the URL as it is."""
    text = os.fspath(url)
    return text if is_remote(text) else Path(text.removeprefix("file://"))


def write_whole(url: str | os.PathLike[str], data: bytes) -> None:
    """Store ``data`` at ``url`` so that no reader ever sees part of it.

    A local file is written beside its name and renamed (its folder made if needed), so a crash
    mid-write leaves the previous file; an object store's PUT is whole by itself.
    """
    where = location(url)
    if isinstance(where, str):
        fs, path = fsspec.core.url_to_fs(where)
        with_retries(fs.pipe_file, path, data)
        return
    where.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=where.parent, prefix=f".{where.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, where)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_whole(url: str | Path) -> bytes | None:
    """The bytes stored at ``url``, or None where nothing is."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if not fs.isfile(path):
        return None
    return bytes(with_retries(fs.cat_file, path))


def with_retries(call: Callable[..., T], *args: Any, attempts: int = 4, delay: float = 0.5) -> T:
    """``call(*args)``, tried again after transient I/O errors, after jittered doubling delays.

    Object stores and network file systems drop connections and time out under load; a
    block should not fail for that. Other errors (bad data, a full disk) fail at once. Each
    retry is counted with the store's faults (:mod:`unet_volume.io.retries`).
    """
    for attempt in range(attempts):
        try:
            return call(*args)
        except Exception as error:
            if attempt == attempts - 1 or not is_transient(error):
                raise
            count(fault_kind(error))
            log.warning("retrying after a transient error (%s): %s", type(error).__name__, error)
            time.sleep(random.uniform(0.5, 1.0) * delay * 2**attempt)
    raise AssertionError("unreachable")


@contextmanager
def removed_on_failure(url: str) -> Iterator[None]:
    """Delete the output at ``url`` if the body raises: nothing partial looks like a result."""
    try:
        yield
    except BaseException:
        remove_output(url)
        raise


def exists(url: str) -> bool:
    """Whether anything is stored at ``url`` (a path or an fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


FAST_PIPELINE = "zarrs.ZarrsCodecPipeline"
"""zarrs' codec pipeline (Rust) for zarr-python: 3x faster sharded writes and reads, measured."""


def fast_io(url: str) -> AbstractContextManager[object]:
    """Arrays opened inside use zarrs' Rust codec pipeline where it serves the store.

    zarr-python's own pipeline spends about 1.8 ms of Python per chunk written (15.9 ms for a
    shard of 8 chunks of 512x512 uint8, against 4.6 ms through zarrs; reads 7.1 vs 2.6 ms):
    more than the compression itself, and on a GPU worker more than the network. zarrs serves
    local files (and object stores, not through fsspec), so other stores keep zarr's pipeline;
    so does a machine without the ``zarrs`` package, or with ``UNET_VOLUME_ZARRS=0``.
    An opened array keeps its pipeline for its life.
    """
    if is_remote(url) or os.environ.get("UNET_VOLUME_ZARRS", "1") == "0" or not _has_zarrs():
        return nullcontext()
    return zarr.config.set({"codec_pipeline.path": FAST_PIPELINE})


@functools.cache
def _has_zarrs() -> bool:
    return importlib.util.find_spec("zarrs") is not None
