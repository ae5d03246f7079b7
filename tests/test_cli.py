"""The ``unet-volume`` command line: its options, its exit codes and what it writes.

The contract: ``unet-volume predict INPUT OUTPUT --model M ...`` and ``unet-volume train IMAGE
LABELS --out M ...``. Bad input (any ``UnetVolumeError``) prints ONE line
``unet-volume <command>: error: ...`` on stderr, exits 2 with no traceback, and writes nothing.

Most cases call ``main([...])`` in this process (an interpreter start with torch costs ~2-3 s);
a few run ``python -m unet_volume`` as a real subprocess, to pin that the process exit code is
``main``'s return value and that nothing else (a warning, a traceback) reaches stderr.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import xarray as xr
import zarr
from distributed import Client

from unet_volume.cli.main import build_parser, main
from unet_volume.cli.train import weight_map_config_from
from unet_volume.cluster.client import dashboard_link
from unet_volume.models.checkpoint import load_model, save_model
from unet_volume.models.unet import UNet
from unet_volume.prediction.run import predict_volume
from unet_volume.testing import ONE_LOCAL_WORKER, blob_volume, snapshot

EXIT_OK, EXIT_USAGE = 0, 2
SUBPROCESS_TIMEOUT_S = 120


def tiny_unet(seed: int = 0) -> UNet:
    # Depth 2 (period 4, halo 20), 8 base channels: 2-channel nets can hide misplaced tiles.
    torch.manual_seed(seed)
    return UNet(in_channels=1, base_channels=8, depth=2, ndim=2, dropout=0.0)


def write_zarr(path: Path, data: np.ndarray) -> str:
    """A real Zarr v3 array on disk with odd chunks (tiles and blocks straddle them)."""
    chunks = tuple(max(1, min(n, c)) for n, c in zip(data.shape, (2, 2, 17, 19)[-data.ndim :]))
    array = zarr.create_array(path, shape=data.shape, dtype=data.dtype, chunks=chunks)
    if data.size:
        array[...] = data
    return str(path)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m unet_volume ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "unet_volume", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def assert_one_error_line(stderr: str, command: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"unet-volume {command}: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_unet(), tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def volume_path(tmp_path: Path) -> str:
    # 3 x 40 x 36 voxels, blocks of 1 x 16 x 16: 3 x 3 x 3 = 27 blocks, edge blocks shrink.
    return write_zarr(tmp_path / "in.zarr", blob_volume((3, 40, 36)))


# --- help -----------------------------------------------------------------------------------


def subparser(command: str) -> argparse.ArgumentParser:
    # argparse has no public way to list a parser's arguments; `_actions` is the de-facto one.
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def assert_help_explains(text: str, actions: list[argparse.Action]) -> None:
    """Each action has a help line of its own: its invocation starts a line, then its help."""
    flat = " ".join(text.split())  # help paragraphs wrap at the terminal width
    for action in actions:
        if action.help == argparse.SUPPRESS:  # an old name kept for scripts, e.g. --chunk-shape
            continue
        name = next(iter(action.option_strings), None) or action.metavar or action.dest
        assert action.help, f"{name} has no help"
        assert re.search(rf"^ +{re.escape(name)}(,|\s|$)", text, re.MULTILINE), (
            f"{name} missing from the help"
        )
        assert " ".join(action.help.split()[:4]) in flat, f"the help of {name} is not shown"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("predict", id="predict"),
        pytest.param("train", id="train"),
        pytest.param("evaluate", id="evaluate"),
        pytest.param("weights", id="weights"),
    ],
)
def test_cli_help_names_and_explains_every_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == EXIT_OK
    text = capsys.readouterr().out
    assert text.startswith(f"usage: unet-volume {command} ")
    actions = subparser(command)._actions
    positionals = [a for a in actions if not a.option_strings]
    assert len(positionals) >= 2 and "-h" in actions[0].option_strings  # e.g. input and output
    assert_help_explains(text, actions)


def test_cli_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == EXIT_OK
    text = capsys.readouterr().out
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(commands.choices) == [
        "convert",
        "ensemble",
        "evaluate",
        "export",
        "models",
        "objects",
        "plan",
        "predict",
        "segment",
        "status",
        "train",
        "weights",
    ]
    # The commands, each with its one-line help; and the options (-h, -v) of the top level.
    assert_help_explains(
        text, [*commands._choices_actions, *(a for a in parser._actions if a.option_strings)]
    )


# --- bad input: one line, exit 2, nothing written ----------------------------------------------


@pytest.fixture
def bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of things that are not usable inputs or checkpoints, and a good input."""
    write_zarr(tmp_path / "in.zarr", blob_volume((2, 24, 24)))
    write_zarr(tmp_path / "flat.zarr", blob_volume((24, 24)))  # (y, x): no z axis
    write_zarr(tmp_path / "empty.zarr", np.zeros((0, 8, 8), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("these are my notes, not a model\n")
    tifffile.imwrite(tmp_path / "image.tif", blob_volume((2, 16, 16)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["missing.zarr"], "input missing.zarr does not exist", id="missing-input"),
        pytest.param(
            ["flat.zarr"], "has shape (24, 24); expected (z, y, x) or (c, z, y, x)", id="2d-input"
        ),
        pytest.param(
            ["empty.zarr"], "input empty.zarr is empty (shape (0, 8, 8))", id="empty-input"
        ),
        # Depth 2: the period is 2**2 = 4 on y and x, and 18 is not a multiple of 4.
        pytest.param(
            ["in.zarr", "--block-shape", "1,18,16"],
            "multiple of the network's period 4",
            id="block-shape",
        ),
        pytest.param(
            ["in.zarr", "--model", "notes.txt"],
            "notes.txt is not a unet-volume checkpoint",
            id="text-checkpoint",
        ),
        pytest.param(
            ["in.zarr", "--model", "image.tif"],
            "image.tif is not a unet-volume checkpoint",
            id="tiff-checkpoint",
        ),
        pytest.param(
            ["in.zarr", "--workers", "0"], "--workers 0 must be at least 1", id="no-workers"
        ),
    ],
)
def test_cli_predict_bad_input_exits_2_with_one_line_and_writes_nothing(
    bad_inputs: Path,
    model_path: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = snapshot(bad_inputs)
    # The last --model wins: the cases that name their own checkpoint replace the good one.
    code = main(
        ["predict", args[0], "out.zarr", "--model", str(model_path), "--no-progress", *args[1:]]
    )
    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert message in assert_one_error_line(captured.err, "predict")
    assert captured.out == ""
    assert not (bad_inputs / "out.zarr").exists()
    assert snapshot(bad_inputs) == before


def test_cli_predict_refuses_an_existing_output_and_leaves_it_untouched(
    bad_inputs: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = bad_inputs / "out.zarr"
    output.mkdir()
    (output / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (output / "results.csv").write_text("someone's earlier work\n")
    before = snapshot(bad_inputs)
    code = main(["predict", "in.zarr", "out.zarr", "--model", str(model_path), "--no-progress"])
    assert code == EXIT_USAGE
    line = assert_one_error_line(capsys.readouterr().err, "predict")
    assert "output out.zarr already exists and is not a resumable" in line
    assert "pass --overwrite" in line
    assert snapshot(bad_inputs) == before


def test_cli_predict_unparsable_block_shape_is_a_usage_error(
    bad_inputs: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse's own error: a usage line first, then the error line; exit 2 as well.
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "in.zarr", "out.zarr", "--model", str(model_path), "--block-shape", "abc"])
    assert exit_info.value.code == EXIT_USAGE
    last = capsys.readouterr().err.splitlines()[-1]
    assert (
        last.startswith("unet-volume predict: error: argument --block-shape: ") and "'abc'" in last
    )
    assert not (bad_inputs / "out.zarr").exists()


@pytest.mark.parametrize(
    ("args", "code", "stdout", "stderr"),
    [
        pytest.param(["--help"], EXIT_OK, r"usage: unet-volume .*", "", id="help"),
        pytest.param(
            ["predict", "missing.zarr", "out.zarr", "--model", "tiny.pt"],
            EXIT_USAGE,
            "",
            r"unet-volume predict: error: input missing.zarr does not exist; [^\n]*\n",
            id="library-error",
        ),
        pytest.param(
            ["predict", "in.zarr", "out.zarr", "--model", "tiny.pt", "--block-shape", "abc"],
            EXIT_USAGE,
            "",
            r"usage: unet-volume predict .*\n"
            r"unet-volume predict: error: argument --block-shape: [^\n]*'abc'\n",
            id="argparse-error",
        ),
    ],
)
def test_cli_process_exit_code_and_output(
    tmp_path: Path, model_path: Path, args: list[str], code: int, stdout: str, stderr: str
) -> None:
    # The whole of stdout and stderr: no warning, no log line, no traceback beside the contract.
    (tmp_path / "tiny.pt").write_bytes(model_path.read_bytes())
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert re.fullmatch(stdout, result.stdout, re.DOTALL), result.stdout
    assert re.fullmatch(stderr, result.stderr, re.DOTALL), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


# --- end to end --------------------------------------------------------------------------------


def predict_args(volume_path: str, output: Path, model_path: Path, *where: str) -> list[str]:
    """``unet-volume predict`` of the tiny model in 1x16x16 blocks on the cluster ``where``."""
    return [
        "predict",
        volume_path,
        str(output),
        "--model",
        str(model_path),
        "--block-shape",
        "1,16,16",
        *where,
        "--no-progress",
        "--voxel-size",
        "50,4,4",
    ]


def on(client: Client) -> tuple[str, str]:
    """The cluster options that send the blocks to the test suite's cluster."""
    return ("--scheduler", client.scheduler.address)


def test_cli_predict_writes_an_xarray_dataset_and_says_how_to_open_it(
    client: Client,
    tmp_path: Path,
    volume_path: str,
    model_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "out.zarr"
    assert main(predict_args(volume_path, output, model_path, *on(client))) == EXIT_OK
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert str(output) in said and "xr.open_zarr(" in said
    # The suite's cluster serves no dashboard: no dead link is printed.
    assert dashboard_link(client) is None and "Dask dashboard" not in said
    assert "27 blocks" in said  # 3 x 3 x 3 blocks of 1 x 16 x 16 over 3 x 40 x 36
    ds = xr.open_zarr(output)  # plain xarray, no help from us
    assert ds.probabilities.dims == ("class", "z", "y", "x")
    assert ds.segmentation.dims == ("z", "y", "x")
    assert ds.probabilities.shape == (2, 3, 40, 36)
    assert ds.z.values.tolist() == [0.0, 50.0, 100.0]  # --voxel-size 50,4,4: z in steps of 50 nm
    assert ds.x.values[-1] == 35 * 4.0 and ds.z.attrs["units"] == "nm"
    assert ds.attrs["unet_volume"]["complete"] is True


def test_cli_predict_again_on_a_complete_output_says_so_and_changes_nothing(
    client: Client,
    tmp_path: Path,
    volume_path: str,
    model_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "out.zarr"
    args = predict_args(volume_path, output, model_path, *on(client))
    assert main(args) == EXIT_OK
    first = snapshot(output)
    capsys.readouterr()
    assert main(args) == EXIT_OK
    assert "is complete (27 blocks): nothing to do" in capsys.readouterr().out
    assert snapshot(output) == first
    assert main([*args, "--overwrite"]) == EXIT_OK
    again = xr.open_zarr(output)
    assert again.attrs["unet_volume"]["complete"] is True
    np.testing.assert_array_equal(
        again.segmentation.values, zarr.open_array(output / "segmentation")[...]
    )


def test_cli_predict_output_is_byte_identical_to_the_library(
    client: Client, tmp_path: Path, volume_path: str, model_path: Path
) -> None:
    cli_output, library_output = tmp_path / "cli.zarr", tmp_path / "library.zarr"
    assert main(predict_args(volume_path, cli_output, model_path, *on(client))) == EXIT_OK
    predict_volume(
        model_path,
        volume_path,
        library_output,
        block_shape=(1, 16, 16),
        client=client,
        voxel_size=(50, 4, 4),
    )
    for name in ("probabilities", "segmentation", "class", "z", "y", "x"):
        cli_array, library_array = (
            zarr.open_array(cli_output / name),
            zarr.open_array(library_output / name),
        )
        assert cli_array.dtype == library_array.dtype and cli_array.chunks == library_array.chunks
        np.testing.assert_array_equal(cli_array[...], library_array[...])


def test_cli_predict_on_a_cluster_spec_starts_and_closes_that_cluster(
    tmp_path: Path, volume_path: str, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "one.yaml"
    spec.write_text(ONE_LOCAL_WORKER)
    output = tmp_path / "out.zarr"
    args = predict_args(volume_path, output, model_path, "--cluster", str(spec))
    assert main(args) == EXIT_OK
    assert xr.open_zarr(output).attrs["unet_volume"]["report"]["blocks"] == 27


def test_cli_predict_takes_a_scheduler_or_a_cluster_spec_not_both(
    volume_path: str, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "predict",
                volume_path,
                "out.zarr",
                "--model",
                str(model_path),
                "--scheduler",
                "tcp://h:8786",
                "--cluster",
                "local",
            ]
        )
    assert exit_info.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


# --- train ---------------------------------------------------------------------------------------


def write_training_pair(root: Path, labels_shape: tuple[int, int, int]) -> tuple[str, str]:
    image = blob_volume((2, 32, 32))
    labels = (255 * (blob_volume(labels_shape) > 150)).astype(
        np.uint8
    )  # the blobs, as a 0/255 mask
    return write_zarr(root / "image.zarr", image), write_zarr(root / "labels.zarr", labels)


TRAIN_TINY = [
    "--steps",
    "3",
    "--depth",
    "2",
    "--base-channels",
    "4",
    "--tile-output",
    "1,20,20",
    "--batch-size",
    "2",
    "--no-progress",
    "--no-weight-map",  # the default weight map is computed on a LocalCluster: tested once
]


@pytest.mark.usefixtures("training_threads")
def test_cli_train_writes_a_loadable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, labels = write_training_pair(tmp_path, (2, 32, 32))
    out = tmp_path / "model.pt"
    assert main(["train", image, labels, "--out", str(out), *TRAIN_TINY]) == EXIT_OK
    assert (
        f"model saved to {out}" in capsys.readouterr().out
    )  # the result goes to stdout, progress to stderr
    model = load_model(out)
    assert (model.config.depth, model.config.base_channels, model.config.ndim) == (2, 4, 2)


@pytest.mark.usefixtures("training_threads")
def test_cli_train_mismatched_labels_exit_2_without_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, labels = write_training_pair(tmp_path, (2, 32, 30))
    before = snapshot(tmp_path)
    code = main(["train", image, labels, "--out", str(tmp_path / "model.pt"), *TRAIN_TINY])
    assert code == EXIT_USAGE
    assert "(2, 32, 30)" in assert_one_error_line(capsys.readouterr().err, "train")
    assert snapshot(tmp_path) == before  # no checkpoint, no temporary file


def test_cli_evaluate_prints_the_metrics_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import tifffile

    labels = np.zeros((2, 16, 16), dtype=np.uint8)
    labels[:, 2:7, 2:7] = labels[:, 9:14, 9:14] = 255  # two cells per slice
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    code = main(
        [
            "evaluate",
            str(tmp_path / "labels.tif"),
            str(tmp_path / "labels.tif"),
            "--json",
            str(tmp_path / "scores.json"),
        ]
    )
    assert code == EXIT_OK
    assert "pixel_error" in capsys.readouterr().out  # the table
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["volume"]["pixel_error"] == 0.0 and scores["volume"]["rand_error"] == 0.0


@pytest.mark.usefixtures("training_threads")
def test_cli_weights_then_train_with_them(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The paper's recipe end to end: weight map of the labels, then a run weighted by it.
    image, labels = write_training_pair(tmp_path, (2, 32, 32))
    weights = str(tmp_path / "weights.zarr")
    code = main(
        [
            "weights",
            labels,
            weights,
            "--scheduler",
            client.scheduler.address,
            "--block-shape",
            "1,32,32",
        ]
    )
    assert code == EXIT_OK and f"wrote {weights}" in capsys.readouterr().out
    stored = zarr.open_array(f"{weights}/weights", mode="r")
    assert stored.shape == (2, 32, 32) and float(np.asarray(stored[:]).min()) > 0
    out = tmp_path / "model.pt"
    assert (
        main(["train", image, labels, "--out", str(out), "--weights", weights, *TRAIN_TINY])
        == EXIT_OK
    )
    assert load_model(out).config.depth == 2


@pytest.mark.parametrize(
    ("flags", "sigma", "said"),
    [
        pytest.param([], 5.0, "y 5, x 5", id="voxels-by-default"),
        pytest.param(["--sigma", "3"], 3.0, "y 3, x 3", id="bare-number-is-voxels"),
        # 5 voxels of 4 nm: WeightMapConfig takes sigma in the voxel size's units, 20 (nm).
        pytest.param(["--voxel-size", "50,4,4"], 20.0, "y 5, x 5 (20 ", id="px-to-nm"),
        pytest.param(["--voxel-size", "50,4,4", "--sigma", "5px"], 20.0, "y 5, x 5", id="px"),
        pytest.param(["--voxel-size", "50,4,4", "--sigma", "8nm"], 8.0, "y 2, x 2", id="nm"),
        pytest.param(
            ["--voxel-size", "50,4,4", "--sigma", "20nm", "--ndim", "3"],
            20.0,
            "z 0.4, y 5, x 5",
            id="anisotropic-3d",
        ),
    ],
)
def test_cli_weights_sigma_unit_is_explicit_and_said_in_voxels(
    client: Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    sigma: float,
    said: str,
) -> None:
    # issue 12: `--voxel-size 50,4,4` used to turn the paper's 5 pixels into 5 nm (1.25 px).
    _, labels = write_training_pair(tmp_path, (2, 32, 32))
    args = ["weights", labels, str(tmp_path / "w.zarr"), *flags]
    assert weight_map_config_from(build_parser().parse_args(args)).sigma == sigma
    assert main([*args, "--scheduler", client.scheduler.address]) == EXIT_OK
    assert f"sigma in voxels: {said}" in capsys.readouterr().err


def test_cli_weights_physical_sigma_without_voxel_size_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, labels = write_training_pair(tmp_path, (2, 32, 32))
    before = snapshot(tmp_path)
    assert main(["weights", labels, str(tmp_path / "w.zarr"), "--sigma", "20nm"]) == EXIT_USAGE
    line = assert_one_error_line(capsys.readouterr().err, "weights")
    assert "--sigma 20nm" in line and "--voxel-size" in line and "--sigma 5px" in line
    assert snapshot(tmp_path) == before


def test_cli_weights_chunk_shape_is_a_deprecated_name_of_block_shape(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, labels = write_training_pair(tmp_path, (2, 32, 32))
    out = tmp_path / "w.zarr"
    args = ["weights", labels, str(out), "--scheduler", client.scheduler.address]
    assert main([*args, "--chunk-shape", "2,32,32"]) == EXIT_OK
    assert "--chunk-shape is deprecated; pass --block-shape" in capsys.readouterr().err
    assert zarr.open_array(out / "weights", mode="r").chunks == (2, 32, 32)  # one chunk per block
    assert "--chunk-shape" not in build_parser().format_help() + subparser("weights").format_help()


def test_cli_convert_chunks_is_a_deprecated_name_of_chunk_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_zarr(tmp_path / "in.zarr", blob_volume((2, 32, 32)))
    out = tmp_path / "out.zarr"
    assert main(["convert", source, str(out), "--chunks", "1,16,16"]) == EXIT_OK
    assert "--chunks is deprecated; pass --chunk-shape" in capsys.readouterr().err
    assert zarr.open_array(out, mode="r").chunks == (1, 16, 16)
    assert "--chunks" not in subparser("convert").format_help()
    # Both names at once: refused in one line, nothing written.
    before = snapshot(tmp_path)
    both = ["convert", source, str(tmp_path / "o2.zarr"), "--chunks", "1,16,16"]
    assert main([*both, "--chunk-shape", "1,8,8"]) == EXIT_USAGE
    line = assert_one_error_line(capsys.readouterr().err, "convert")
    assert "--chunks is the old name of --chunk-shape" in line
    assert snapshot(tmp_path) == before


def test_cli_weights_prints_no_dask_logs_without_verbose(tmp_path: Path) -> None:
    # issue 12: distributed sets INFO on its loggers when imported, after the CLI set WARNING.
    _, labels = write_training_pair(tmp_path, (1, 16, 16))
    result = run_cli(["weights", labels, "w.zarr", "--workers", "1"], cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["sigma in voxels", "Dask dashboard"], lines


def test_cli_stops_quietly_when_its_reader_goes_away(tmp_path: Path) -> None:
    # `unet-volume models | head -1`: the reader closes the pipe before the output is written
    # (here before the interpreter has even started); no traceback, the shell's SIGPIPE code.
    process = subprocess.Popen(
        [sys.executable, "-m", "unet_volume", "models"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert stderr == ""
    assert process.returncode == 141
