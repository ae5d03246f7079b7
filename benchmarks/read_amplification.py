"""How much of its input a prediction run reads: per input layout and per store.

A run over a volume should fetch (and decode) each stored input chunk about once. For each
layout (chunking) below, a cheap net of the paper's depth (2D: depth 4, 92-voxel halo; 3D:
depth 3, base 1 channel, random weights) predicts the volume with the default options on a
LocalCluster of 2 single-threaded workers, reading from:

- ``local``: a Zarr directory on local disk; the run's own count of chunks decoded
  (``RunReport.chunks_read``, where the engine has it);
- ``http``: the same directory served by a plain HTTP server on 127.0.0.1 (range requests
  included) that counts the requests and body bytes it sends;
- ``s3``: the same array in a bucket of moto's S3 API server (``pip install 'moto[server]'``),
  behind a proxy that counts likewise; the output goes to the bucket too.

Printed per run: fetched bytes over stored bytes (chunk objects only), chunk requests over
stored chunks (a sharded input's inner chunks, read by byte range), all requests (the output's
writes and metadata included), Mvoxel/s (engine time), peak worker memory (ru_maxrss).

    .venv/bin/python benchmarks/read_amplification.py [--stores local,http,s3] [--layouts a,b]
    .venv/bin/python benchmarks/read_amplification.py --per-shard   # one shard per task
    .venv/bin/python benchmarks/read_amplification.py --fail 0.05   # 5% of requests fail

``--per-shard`` runs one task per shard (``task_shape`` = the shard), as the engine did before
tasks read their shards together. The script uses the public API only, so it also runs on
earlier versions of the package (without ``--per-shard``), for the figures before a change.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr

from unet_volume.cluster.client import open_client
from unet_volume.models.checkpoint import save_model
from unet_volume.models.unet import UNet
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.plan import plan_prediction
from unet_volume.prediction.run import run_plan
from unet_volume.testing.stores import CountingProxy, FolderServer, S3Server, s3_environment


@dataclass(frozen=True)
class Layout:
    name: str
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    ndim: int
    shards: tuple[int, int, int] | None = None


LAYOUTS = [
    Layout("a", (16, 1536, 1536), (1, 512, 512), 2),
    Layout("b", (12, 1024, 1024), (4, 256, 256), 2),
    Layout("c", (192, 256, 256), (64, 64, 64), 3),
    Layout("d", (16, 1536, 1536), (1, 1024, 1024), 2),
    Layout("e", (256, 512, 512), (128, 128, 128), 3),
    Layout("f", (16, 1536, 1536), (1, 128, 128), 2, shards=(1, 512, 512)),
]
DEPTH = {2: 4, 3: 3}
BUCKET = "bench"


def describe(layout: Layout) -> str:
    fmt = "x".join
    sharded = f" in shards of {fmt(map(str, layout.shards))}" if layout.shards else ""
    return (
        f"({layout.name}) {fmt(map(str, layout.shape))} uint8 in {fmt(map(str, layout.chunks))} "
        f"chunks{sharded}, {layout.ndim}D net"
    )


def write_input(root: Path, layout: Layout) -> tuple[Path, int, int]:
    """The input array (random uint8: chunks as large stored as decoded); its stored chunk
    bytes and its stored objects."""
    path = root / f"in-{layout.name}.zarr"
    if not path.exists():
        _write_random(path, layout)
    objects = [p for p in (path / "c").rglob("*") if p.is_file()]
    return path, sum(p.stat().st_size for p in objects), len(objects)


def _write_random(path: Path, layout: Layout) -> None:
    array = zarr.create_array(
        path, shape=layout.shape, chunks=layout.chunks, shards=layout.shards, dtype="uint8"
    )
    rng = np.random.default_rng(0)
    step = (layout.shards or layout.chunks)[0]
    for z in range(0, layout.shape[0], step):
        part = (min(step, layout.shape[0] - z), *layout.shape[1:])
        array[z : z + step] = rng.integers(0, 256, part, dtype=np.uint8)


def model(root: Path, ndim: int) -> Path:
    path = root / f"net{ndim}d.pt"
    if not path.exists():
        save_model(UNet(ndim=ndim, depth=DEPTH[ndim], base_channels=1), path)
    return path


def peak_worker_mib(client: Any) -> float:
    rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return max(rss.values()) / 1024


def run(image: str, out: str, net: Path, per_shard: bool) -> tuple[Any, Any, float]:
    """One prediction on a fresh 2-worker cluster; the report, the plan and peak memory."""
    options = PredictOptions()
    plan = plan_prediction(net, image, out, options)
    if per_shard:
        plan = plan_prediction(net, image, out, PredictOptions(task_shape=plan.shard_shape))
    with open_client(n_workers=2, dashboard=False) as client:
        report = run_plan(plan, client)
        peak = peak_worker_mib(client)
    return report, plan, peak


def measure(
    root: Path, layout: Layout, store: str, per_shard: bool, s3: Any, fail: float = 0.0
) -> dict[str, Any]:
    path, stored_bytes, objects = write_input(root, layout)
    net = model(root, layout.ndim)
    out = str(root / f"out-{layout.name}-{store}.zarr")
    if Path(out).exists():
        fsspec.filesystem("file").rm(out, recursive=True)
    if store == "local":
        report, plan, peak = run(str(path), out, net, per_shard)
        chunks_read = getattr(report, "chunks_read", None)  # earlier versions: not counted
        chunk_bytes = stored_bytes / max(1, _chunk_count(layout))
        fetched = None if chunks_read is None else chunks_read * chunk_bytes
        requests, all_requests, injected = None, None, 0
    elif store == "http":
        with FolderServer(root) as server, CountingProxy(server.url, fail=fail) as proxy:
            report, plan, peak = run(f"{proxy.url}/{path.name}", out, net, per_shard)
            requests, fetched = proxy.traffic.total(chunks=True)
            all_requests = sum(proxy.traffic.requests.values())
            injected = sum(proxy.traffic.faults.values())
    else:
        server, proxy = s3
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": server.url})
        key = f"{BUCKET}/{path.name}"
        if not fs.exists(key):
            fs.put(str(path), key, recursive=True)
        out_key = f"s3://{BUCKET}/{Path(out).name}"
        if fs.exists(out_key):
            fs.rm(out_key, recursive=True)
        proxy.traffic.clear()
        proxy.fail = fail
        report, plan, peak = run(f"s3://{key}", out_key, net, per_shard)
        proxy.fail = 0.0
        requests, fetched = proxy.traffic.total(under=f"/{key}/", chunks=True)
        all_requests = sum(proxy.traffic.requests.values())
        injected = sum(proxy.traffic.faults.values())
    return {
        "tasks": getattr(report, "tasks", None) or plan.layout.num_shards,
        "task_shape": getattr(plan, "task_shape", None) or plan.shard_shape,
        "amplification": None if fetched is None else fetched / stored_bytes,
        "requests": None if requests is None else requests / _chunk_count(layout),
        "all_requests": all_requests,
        "chunks": _chunk_count(layout),
        "objects": objects,
        "mvoxel_s": report.voxels / report.seconds / 1e6,
        "peak_mib": peak,
        "injected": injected,
        "counted": sum(getattr(report, "store_faults", {}).values()),
        "seconds": report.seconds,
    }


def _chunk_count(layout: Layout) -> int:
    return int(np.prod([-(-n // c) for n, c in zip(layout.shape, layout.chunks)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", default="local,http,s3")
    parser.add_argument("--layouts", default=",".join(layout.name for layout in LAYOUTS))
    parser.add_argument("--per-shard", action="store_true", help="one shard per task")
    parser.add_argument("--workdir", type=Path, help="inputs and outputs (default: a tmp dir)")
    parser.add_argument(
        "--fail",
        type=float,
        default=0.0,
        help="share of chunk requests (http, s3) that fail transiently (503, drop, short)",
    )
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="read-amplification-"))
    root.mkdir(parents=True, exist_ok=True)
    stores = args.stores.split(",")
    chosen = [layout for layout in LAYOUTS if layout.name in args.layouts.split(",")]
    s3 = None
    with contextlib.ExitStack() as stack:
        if "s3" in stores:
            server = stack.enter_context(S3Server())
            proxy = stack.enter_context(CountingProxy(server.url))
            stack.enter_context(s3_environment(proxy.url))
            fsspec.filesystem("s3", client_kwargs={"endpoint_url": server.url}).mkdir(BUCKET)
            s3 = (server, proxy)
        for layout in chosen:
            print(describe(layout), flush=True)
            for store in stores:
                start = time.perf_counter()
                f = measure(root, layout, store, args.per_shard, s3, args.fail)
                requests = "-" if f["requests"] is None else f"{f['requests']:.2f}x"
                fetched = "-" if f["amplification"] is None else f"{f['amplification']:.2f}x"
                stored = f"{f['chunks']} stored chunks"
                if f["objects"] != f["chunks"]:
                    stored += f" (in {f['objects']} objects)"
                print(
                    f"  {store:5s}: fetched {fetched} the stored bytes, chunk "
                    f"requests {requests} the {stored} "
                    f"({f['all_requests'] or '-'} requests in all); {f['tasks']} tasks of "
                    f"{'x'.join(map(str, f['task_shape']))}; {f['mvoxel_s']:.2f} Mvoxel/s; peak "
                    f"worker {f['peak_mib']:.0f} MiB; engine {f['seconds']:.1f} s "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
                if args.fail:
                    print(
                        f"         faults injected {f['injected']}, counted by the workers "
                        f"{f['counted']}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
