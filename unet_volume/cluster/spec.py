"""Cluster specs: a Dask cluster described as data in ``deploy/clusters/*.yaml``.

A spec names the upstream cluster manager with ``kind`` and passes every other key,
verbatim, to its constructor (``local``: ``distributed.LocalCluster``, ``slurm``:
``dask_jobqueue.SLURMCluster``, ``kubernetes``: ``dask_kubernetes.operator.KubeCluster``);
an optional ``scale`` key asks for that many workers (SLURM jobs, worker pods) once it
has started, or ``adapt: {minimum: 0, maximum: 8}`` lets Dask ask for workers as blocks queue
up and release them when idle; ``storage_options`` gives fsspec's options per protocol to every
worker (an object store's endpoint, a profile of the AWS config files; this process, which plans
and records the run, takes its own environment)::

    kind: slurm
    scale: 4
    cores: 1
    memory: 32GiB
    storage_options:
      s3: {endpoint_url: "https://s3.institute.example", profile: segmentation}

Keeping settings as data means one code path for every site: a site edits its own
copy of a spec (account, partition, image), never the code, and the upstream
projects keep owning scheduling, queues and pods. This module imports neither
torch nor the optional backends, so it loads anywhere. Callers get a client of such a
cluster through :func:`unet_volume.cluster.client.open_client`.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import dask
import yaml
from distributed import LocalCluster
from distributed.deploy.cluster import Cluster

from unet_volume.errors import InputError

Kind = Literal["local", "local-cuda", "slurm", "kubernetes"]
KINDS: tuple[str, ...] = get_args(Kind)
DIRECTORY_VARIABLE = "UNET_VOLUME_CLUSTERS"
DEFAULT_DIRECTORY = Path("deploy", "clusters")
# Options naming a file that the upstream constructor opens: relative to the spec file,
# so a spec works from any working directory.
PATH_OPTIONS: dict[str, tuple[str, ...]] = {"kubernetes": ("custom_cluster_spec",)}
LOCAL_START_TIMEOUT = 60.0  # seconds for local worker processes to start
EXTRAS = {
    "local-cuda": ("dask-cuda", "cuda"),
    "slurm": ("dask-jobqueue", "slurm"),
    "kubernetes": ("dask-kubernetes", "k8s"),
}
BACKENDS = {
    # One worker per GPU of this machine, each pinned to its GPU (CUDA_VISIBLE_DEVICES).
    "local-cuda": ("dask_cuda", "LocalCUDACluster"),
    "slurm": ("dask_jobqueue", "SLURMCluster"),
    "kubernetes": ("dask_kubernetes.operator", "KubeCluster"),
}


WORKER_PROFILE_OFF = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"
"""The environment setting that turns off a Dask worker's statistical profiler.

The profiler samples every thread's stack every 10 ms and keeps one tree per second for an
hour: a worker's RSS grew by ~90 KB/s (140 MB over a 25-minute run) before it levelled off.
Every shipped spec turns it off (local workers through :func:`local_cluster_config`, SLURM
jobs in their prologue, the worker image in its environment); set it back to ``True`` for a
dashboard profile while debugging.
"""
ONE_ARENA = "MALLOC_ARENA_MAX=1"
"""The environment setting that gives a worker one glibc malloc arena.

Each thread that allocates (the task thread, zarrs' codec threads, the event loop) otherwise
gets an arena of its own, and freed memory stays resident in each: a worker's peak grew with
the volume though its blocks did not (segment, components 3D, blocks 64x256x256: 520 MB at
512^3, 648 MB at 640^3; with one arena 334 and 350 MB, at the same speed). Prediction ran as
fast with it (2.54 against 2.32 Mvoxel/s on 2 workers: the machine's noise). Set in every
shipped spec, as :data:`WORKER_PROFILE_OFF`.
"""


def local_cluster_config() -> dict[str, object]:
    """Dask settings for clusters we start (their scheduler, and local worker processes).

    - Keep glibc's dynamic mmap threshold: the nanny's default ``MALLOC_TRIM_THRESHOLD_=65536``
      makes torch CPU inference ~40% slower.
    - A task whose worker dies twice is given up (``KilledWorker``), not retried on every
      worker in turn: a block that runs out of memory or crashes is recorded as failed.
    - No statistical profiler in the workers (:data:`WORKER_PROFILE_OFF`).
    - One malloc arena per worker (:data:`ONE_ARENA`).
    """
    return {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        "distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1,
        "distributed.scheduler.allowed-failures": 1,
        "distributed.worker.profile.enabled": False,
    }


def start_local_cluster(options: Mapping[str, Any], *, scale: int | None = None) -> Cluster:
    """``LocalCluster(**options)`` scaled to ``scale`` workers (waited for; None: as started).

    The one place a LocalCluster is started, for specs and for the default cluster alike, so
    that every worker it starts, ``scale``'s too, spawns under :func:`local_cluster_config`.
    """
    with dask.config.set(local_cluster_config()), _ctrl_c_left_to_the_caller():
        local = LocalCluster(**options)  # type: ignore[no-untyped-call]
        return _scaled(local, scale, wait=True)


@contextmanager
def _ctrl_c_left_to_the_caller() -> Iterator[None]:
    """Worker processes started in the body ignore SIGINT; the caller's handler comes back.

    Ctrl-C in a terminal reaches the whole process group: the workers would each print a
    KeyboardInterrupt traceback while the caller, which owns them, stops and closes them.
    An ignored signal stays ignored in the processes spawned meanwhile (and theirs).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its processes are not ours to start
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


@dataclass(frozen=True)
class ClusterSpec:
    """One cluster spec file: the backend ``kind`` plus its constructor's ``options``.

    ``options`` go verbatim to the upstream constructor; ``scale`` (None: leave the
    constructor's default) is requested after start, or ``adapt`` (``minimum``, ``maximum``
    workers) makes the cluster adaptive; ``storage_options`` are fsspec's keyword arguments
    per protocol (:class:`~unet_volume.cluster.client.StorageOptions`); ``name`` is the file's stem.

    >>> spec = ClusterSpec("one", "local", {"n_workers": 1}, None, Path("one.yaml"))
    >>> spec.kind, spec.options["n_workers"], spec.scale
    ('local', 1, None)
    """

    name: str
    kind: Kind
    options: dict[str, Any] = field(hash=False)
    scale: int | None
    path: Path
    adapt: dict[str, int] | None = field(default=None, hash=False)
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, repr=False)

    @property
    def starts_empty(self) -> bool:
        """Whether it may have no worker until work arrives (adaptive from a minimum of 0)."""
        return self.adapt is not None and self.adapt.get("minimum", 0) == 0


def load_cluster_spec(name_or_path: str | Path, *, directory: Path | None = None) -> ClusterSpec:
    """Read a spec from a YAML file, or by bare name from ``directory/<name>.yaml``.

    A string with a path separator or a ``.yaml``/``.yml`` suffix (or any ``Path``) is a
    file; anything else is a name. ``directory`` defaults to ``$UNET_VOLUME_CLUSTERS``,
    else ``deploy/clusters`` under the working directory (the repository root). Every
    problem raises :class:`InputError` with a one-line message saying how to fix it.
    """
    path = _find_spec(name_or_path, directory)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(
            f"cannot read cluster spec {path}: {error}; pass a readable YAML file"
        ) from error
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise InputError(
            f"cluster spec {path} is not valid YAML ({problem}); fix the file"
        ) from error
    if not isinstance(data, dict):
        raise InputError(
            f"cluster spec {path} must be a YAML mapping, got {type(data).__name__} "
            f"{data!r:.40}; write keys such as 'kind: local'"
        )
    options = dict(data)
    kind = options.pop("kind", None)
    if kind not in KINDS:
        raise InputError(
            f"cluster spec {path} has kind {kind!r}; set 'kind:' to one of {', '.join(KINDS)}"
        )
    scale = options.pop("scale", None)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 0):
        raise InputError(
            f"cluster spec {path} has scale {scale!r}; set 'scale:' to a worker count >= 0 or null"
        )
    adapt = _adapt_option(options.pop("adapt", None), path)
    storage = _storage_option(options.pop("storage_options", None), path)
    if adapt is not None and scale is not None:
        raise InputError(
            f"cluster spec {path} has both scale and adapt; keep one (adapt: a minimum and a "
            "maximum number of workers, scale: a fixed number)"
        )
    if bad := [key for key in options if not isinstance(key, str)]:
        raise InputError(
            f"cluster spec {path} has non-string keys {bad!r}; quote them or remove them"
        )
    for key in PATH_OPTIONS.get(kind, ()):
        if isinstance(options.get(key), str):
            options[key] = str((path.parent / Path(options[key]).expanduser()).resolve())
    return ClusterSpec(path.stem, cast(Kind, kind), options, scale, path, adapt, storage)


def _storage_option(value: Any, path: Path) -> dict[str, dict[str, Any]]:
    """``storage_options: {s3: {endpoint_url: ...}}`` checked: a mapping per protocol."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in value.items()
    ):
        raise InputError(
            f"cluster spec {path} has storage_options of the wrong shape; write a mapping per "
            "protocol, e.g. 'storage_options: {s3: {endpoint_url: https://s3.example}}'"
        )
    return {protocol: dict(kwargs) for protocol, kwargs in value.items()}


def _adapt_option(value: Any, path: Path) -> dict[str, int] | None:
    """``adapt: {minimum: 0, maximum: 8}`` checked: worker counts, minimum <= maximum."""
    if value is None:
        return None
    counts = value if isinstance(value, dict) else {}
    if (
        not counts
        or set(counts) - {"minimum", "maximum"}
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts.values())
        or counts.get("minimum", 0) > counts.get("maximum", counts.get("minimum", 0))
    ):
        raise InputError(
            f"cluster spec {path} has adapt {value!r}; write e.g. 'adapt: {{minimum: 0, "
            "maximum: 8}' (worker counts, minimum <= maximum)"
        )
    return dict(counts)


def make_cluster(spec: ClusterSpec) -> Cluster:
    """Start the upstream cluster the spec describes, then scale it to ``spec.scale``.

    The caller owns the result (``with make_cluster(spec) as cluster, Client(cluster)``).
    LocalCluster workers started here, including those ``scale`` asks for (waited for, as
    ``scale`` only schedules them), spawn without the nanny's ``MALLOC_TRIM_THRESHOLD_``
    (it slows torch ~40%); workers added later by ``cluster.scale``/``adapt``, and remote
    workers, rely on ``tune_worker_process`` instead. The optional backends are imported
    here only, so a missing one names the extra to install.
    """
    if spec.kind == "local":
        cluster = start_local_cluster(spec.options, scale=spec.scale)
    else:
        module, name = BACKENDS[spec.kind]
        backend = _import_backend(spec, module, name)
        with dask.config.set(local_cluster_config()):  # the scheduler runs in this process
            cluster = _scaled(backend(**spec.options), spec.scale)
    if spec.adapt is not None:
        cluster.adapt(**spec.adapt)  # type: ignore[arg-type]  # distributed's stub: Adaptive's keys
    return cluster


def _scaled(cluster: Cluster, scale: int | None, *, wait: bool = False) -> Cluster:
    """``cluster`` asked for ``scale`` workers (None: as started); closed if that fails.

    ``wait`` blocks until they run: right for local processes, wrong for a batch queue.
    """
    if scale is None:
        return cluster
    try:
        cluster.scale(scale)
        if wait and scale > 0:
            cluster.wait_for_workers(scale, timeout=LOCAL_START_TIMEOUT)
    except BaseException:
        cluster.close()  # never leak a started scheduler, SLURM jobs or pods
        raise
    return cluster


def _find_spec(name_or_path: str | Path, directory: Path | None) -> Path:
    """The spec file a name or path refers to; unknown names list the known ones."""
    text = str(name_or_path)
    if (
        isinstance(name_or_path, Path)
        or "/" in text
        or os.sep in text
        or text.endswith((".yaml", ".yml"))
    ):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise InputError(
                f"cluster spec file {path} does not exist; pass an existing YAML file "
                "or the name of a spec in deploy/clusters"
            )
        return path.resolve()
    folder = directory or Path(os.environ.get(DIRECTORY_VARIABLE) or DEFAULT_DIRECTORY)
    path = folder / f"{text}.yaml"
    if not path.is_file():
        names = sorted(candidate.stem for candidate in folder.glob("*.yaml"))
        known = (
            f"one of {', '.join(names)}"
            if names
            else f"a path to a spec file (no specs in {folder})"
        )
        raise InputError(
            f"unknown cluster spec {text!r} (looked for {path}); pass {known}, "
            f"or set {DIRECTORY_VARIABLE} to the folder holding it"
        )
    return path.resolve()


def _import_backend(spec: ClusterSpec, module: str, attribute: str) -> Any:
    """``module.attribute``, or an InputError naming the extra that provides it.

    dask-jobqueue 0.9 replaces the SIGINT handler when imported (``dask_jobqueue.runner``:
    ``sys.exit()`` on Ctrl-C), which made an interrupted run exit 0 without a word; the
    handler in place before the import is put back.
    """
    handler = signal.getsignal(signal.SIGINT)
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as error:
        package, extra = EXTRAS[spec.kind]
        raise InputError(
            f"cluster spec {spec.path} has kind {spec.kind!r}, which needs {package} "
            f"({error}); pip install 'unet-volume[{extra}]'"
        ) from error
    finally:
        if threading.current_thread() is threading.main_thread() and handler is not None:
            signal.signal(signal.SIGINT, handler)
