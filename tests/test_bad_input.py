"""Bad input through the real CLI: one line naming the problem and the fix, exit code 2.

Found before a run starts, nothing is written or changed anywhere (the whole folder is compared
byte for byte and by modification time). Found while running (NaN, a damaged chunk), the finished
blocks are kept and the failures recorded in the output.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client

from unet_volume.cli.main import main
from unet_volume.models.checkpoint import save_model
from unet_volume.models.unet import UNet
from unet_volume.output.bookkeeping import Lease, write_lease
from unet_volume.output.lifecycle import read_status
from unet_volume.testing import blob_labels, blob_volume, free_port_cluster, snapshot, write_zarr

EXIT_USAGE = 2
SHAPE = (3, 40, 36)  # blocks of 1 x 16 x 16: 27


class Payload:
    """A pickle that, if ever unpickled, creates a file: checkpoints must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def setup_files(root: Path) -> dict[str, str]:
    """Every file the cases use, written before the snapshot."""
    torch.manual_seed(0)
    model = save_model(UNet(base_channels=8, depth=2, dropout=0.0), root / "model.pt")
    image = blob_volume(SHAPE)
    files = {
        "model": str(model),
        "image": write_zarr(root / "image.zarr", image),
        "image2c": write_zarr(root / "image2c.zarr", blob_volume(SHAPE, channels=2)),
        "empty": write_zarr(root / "empty.zarr", np.zeros((0, 8, 8), np.uint8)),
        "flat": write_zarr(root / "flat.zarr", image[0]),
        "labels": write_zarr(root / "labels.zarr", blob_labels(SHAPE, 12)),
        "negative": write_zarr(root / "negative.zarr", blob_labels(SHAPE, 12).astype(np.int16) - 1),
        "float_labels": write_zarr(root / "float.zarr", blob_labels(SHAPE, 12).astype(np.float32)),
        "mask": write_zarr(root / "mask.zarr", (blob_labels(SHAPE, 12) > 0).astype(np.uint8)),
        "short_labels": write_zarr(root / "short.zarr", blob_labels((2, 40, 36), 8)),
    }
    files["damaged"] = write_zarr(root / "damaged.zarr", image, chunks=(1, 20, 18))
    # the chunk the fingerprint samples in the last slice (it holds the slice's centre)
    (root / "damaged.zarr" / "c" / "2" / "1" / "1").write_bytes(b"garbage")
    (root / "not-a-model.pt").write_bytes(b"\x00" * 64)
    (root / "truncated.pt").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (root / "pickle.pt").write_bytes(pickle.dumps(Payload(root / "payload-ran")))
    (root / "busy.zarr").mkdir()
    (root / "busy.zarr" / "notes.txt").write_text("not a prediction\n")
    (root / "a-file").write_text("a file, not a folder\n")
    return files


def predict(
    f: dict[str, str], root: Path, *extra: str, image: str = "", model: str = ""
) -> list[str]:
    return [
        "predict",
        image or f["image"],
        str(root / "out.zarr"),
        "--model",
        model or f["model"],
        "--block-shape",
        "1,16,16",
        "--no-progress",
        *extra,
    ]


CASES: list[tuple[str, Callable[[dict[str, str], Path], list[str]], str]] = [
    (
        "predict-missing-input",
        lambda f, r: predict(f, r, image=str(r / "nope.zarr")),
        "does not exist",
    ),
    ("predict-empty-input", lambda f, r: predict(f, r, image=f["empty"]), "empty"),
    ("predict-2d-input", lambda f, r: predict(f, r, image=f["flat"]), "(z, y, x)"),
    (
        "predict-channels",
        lambda f, r: predict(f, r, image=f["image2c"]),
        "2 channel(s) but the model expects 1",
    ),
    ("predict-missing-model", lambda f, r: predict(f, r, model=str(r / "no.pt")), "does not exist"),
    (
        "predict-not-a-model",
        lambda f, r: predict(f, r, model=str(r / "not-a-model.pt")),
        "not a unet-volume checkpoint",
    ),
    (
        "predict-truncated-model",
        lambda f, r: predict(f, r, model=str(r / "truncated.pt")),
        "truncated.pt",
    ),
    (
        "predict-pickle-with-code",
        lambda f, r: predict(f, r, model=str(r / "pickle.pt")),
        "pickle.pt",
    ),
    (
        "predict-label-offset-over-a-voxel",
        lambda f, r: predict(f, r, "--label-offset", "1.5,0"),
        "label offset (1.5, 0.0) must be numbers of voxels in [-1, 1]",
    ),
    (
        "predict-block-off-lattice",
        lambda f, r: predict(f, r, "--block-shape", "1,18,16"),
        "period 4",
    ),
    (
        "predict-existing-other-data",
        lambda f, r: [*predict(f, r)[:2], str(r / "busy.zarr"), *predict(f, r)[3:]],
        "not a resumable",
    ),
    (
        "predict-output-not-writable",
        lambda f, r: [*predict(f, r)[:2], str(r / "a-file" / "out.zarr"), *predict(f, r)[3:]],
        "cannot be created",
    ),
    (
        "predict-damaged-chunk",
        lambda f, r: predict(f, r, image=f["damaged"]),
        "chunk (2, 1, 1) (key c/2/1/1) is damaged",
    ),
    (
        "predict-negative-max-failures",
        lambda f, r: predict(f, r, "--max-failures", "-1"),
        "max_failures must be",
    ),
    (
        "predict-zero-stall-after",
        lambda f, r: predict(f, r, "--stall-after", "0"),
        "stall_after must be",
    ),
    (
        "weights-negative-labels",
        lambda f, r: ["weights", f["negative"], str(r / "w.zarr")],
        "negative values",
    ),
    (
        "weights-float-labels",
        lambda f, r: ["weights", f["float_labels"], str(r / "w.zarr")],
        "integer labels",
    ),
    (
        "weights-mask-across-blocks",
        lambda f, r: [
            "weights",
            f["mask"],
            str(r / "w.zarr"),
            "--ndim",
            "3",
            "--block-shape",
            "1,16,16",
        ],
        "label the cells first",
    ),
    (
        "weights-physical-sigma",
        lambda f, r: ["weights", f["labels"], str(r / "w.zarr"), "--sigma", "20nm"],
        "--voxel-size",
    ),
    (
        "train-labels-shape",
        lambda f, r: ["train", f["image"], f["short_labels"], "--out", str(r / "m.pt")],
        "shape",
    ),
    (
        "train-negative-labels",
        lambda f, r: ["train", f["image"], f["negative"], "--out", str(r / "m.pt")],
        "negative values (min -1 in slice 0)",
    ),
    (
        "train-float-labels",
        lambda f, r: ["train", f["image"], f["float_labels"], "--out", str(r / "m.pt")],
        "float32, not integers",
    ),
    (
        "train-z-range-outside",
        lambda f, r: [
            "train",
            f["image"],
            f["labels"],
            "--out",
            str(r / "m.pt"),
            "--z-range",
            "0:9",
        ],
        "z range 0:9",
    ),
    (
        "train-zero-steps",
        lambda f, r: ["train", f["image"], f["labels"], "--out", str(r / "m.pt"), "--steps", "0"],
        "steps must be",
    ),
    (
        "evaluate-shape",
        lambda f, r: ["evaluate", f["image"], f["short_labels"]],
        "same (z, y, x) shape",
    ),
    (
        "status-not-a-prediction",
        lambda f, r: ["status", str(r / "busy.zarr")],
        "not a unet-volume output",
    ),
]


def one_error_line(stderr: str, command: str) -> str:
    """The one error line; progress lines (blocks, dashboard) may come before it, no traceback."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith(f"unet-volume {command}: error: "), errors[0]
    return errors[0]


@pytest.mark.parametrize(("case", "args", "named"), [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_before_a_run_is_one_line_exit_2_and_changes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    args: Callable[[dict[str, str], Path], list[str]],
    named: str,
) -> None:
    files = setup_files(tmp_path)
    argv = args(files, tmp_path)
    before = snapshot(tmp_path)
    assert main(argv) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err, argv[0])
    assert named in line
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "payload-ran").exists()  # the pickle's code never ran


@pytest.fixture(scope="module")
def small_workers() -> Iterator[Client]:
    """One worker process with a memory limit of 1 GiB."""
    with (
        free_port_cluster(n_workers=1, threads_per_worker=1, memory_limit="1GiB") as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.mark.parametrize("command", ["predict", "weights"])
def test_bad_input_a_block_too_large_for_the_workers_memory_is_refused_printing_the_estimate(
    small_workers: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    files = setup_files(tmp_path)
    # 1 x 4096 x 4096 voxels, none stored: a block of all of it is refused before any is read.
    big = tmp_path / "big.zarr"
    zarr.create_array(big, shape=(1, 4096, 4096), chunks=(1, 1024, 1024), dtype="uint16")
    where = ("--scheduler", small_workers.scheduler.address, "--block-shape", "1,4096,4096")
    argv = (
        [*predict(files, tmp_path, image=str(big)), *where]
        if command == "predict"
        else ["weights", str(big), str(tmp_path / "w.zarr"), *where]
    )
    before = snapshot(tmp_path)
    assert main(argv) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err, command)
    assert "block 1x4096x4096 needs about" in line and "GiB" in line
    assert "more than the workers' memory limit of 1.0 GiB" in line and "--block-shape" in line
    assert snapshot(tmp_path) == before


def nan_image(root: Path) -> str:
    """The image with a NaN at (1, 20, 18), inside the chunk the fingerprint samples in slice 1:
    its slice-1 blocks fail while running, and fixing it in place changes the fingerprint."""
    data = blob_volume(SHAPE).astype(np.float32)
    data[1, 20, 18] = np.nan
    return write_zarr(root / "nan.zarr", data)


def test_bad_input_an_output_another_live_run_writes_is_refused(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = setup_files(tmp_path)
    args = predict(
        files, tmp_path, "--scheduler", client.scheduler.address, image=nan_image(tmp_path)
    )
    assert main(args) == EXIT_USAGE  # the NaN blocks fail; the others are kept
    write_lease(str(tmp_path / "out.zarr"), Lease("other-host:1:x", time.time() + 60))
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(args) == EXIT_USAGE
    assert "being written by another run" in one_error_line(capsys.readouterr().err, "predict")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["nan", "corrupt-chunk"])
def test_bad_input_found_while_running_keeps_finished_blocks_and_records_it(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    files = setup_files(tmp_path)
    # Five slices: the input's fingerprint samples slices 0, 2 and 4, so damage in slice 3 is
    # found by the blocks that read it, while running.
    data = blob_volume((5, 40, 36)).astype(np.float32)
    if damage == "nan":
        data[3, 20, 20] = np.inf
        image = write_zarr(tmp_path / "bad.zarr", data)
        named = "holds inf at voxel (z, y, x) (3, 20, 20)"
    else:
        image = write_zarr(tmp_path / "bad.zarr", data, chunks=(1, 20, 18))
        (tmp_path / "bad.zarr" / "c" / "3" / "1" / "0").write_bytes(b"garbage")
        named = "chunk (3, 1, 0) (key c/3/1/0) is damaged"
    args = predict(files, tmp_path, "--scheduler", client.scheduler.address, image=image)
    assert main(args) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err, "predict")
    assert named in line and "finished blocks are kept" in line
    status = read_status(str(tmp_path / "out.zarr"))
    assert status.failures and status.done == 45 - len(status.failures) and not status.complete
    assert {failure.index[0] for failure in status.failures} == {3}


def test_bad_input_an_input_changed_between_a_run_and_its_resume_is_refused(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = setup_files(tmp_path)
    image = nan_image(tmp_path)
    args = predict(files, tmp_path, "--scheduler", client.scheduler.address, image=image)
    assert main(args) == EXIT_USAGE
    fixed = np.nan_to_num(zarr.open_array(image)[...])
    zarr.open_array(image, mode="r+")[...] = fixed  # fixed in place: another input
    capsys.readouterr()
    assert main(args) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err, "predict")
    assert "holds another run (input.samples_sha256: " in line and "--overwrite" in line
