"""The shipped models: a name on the command line is the very model that was measured.

Each shipped checkpoint loads by its name, its bytes hash to its record's sha256, it fits the
size budget of a repository file, and its recorded read-out reproduces its recorded figures on
the shipped ISBI slices 20-24 (its segmentation's pixel error, its objects' Rand error; within
what another CPU's float rounding can move). A local path always wins over a name; a damaged
file or an unknown name is refused in one line that says what to do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tifffile
import torch
import zarr
from distributed import Client

from unet_volume.cli.main import main
from unet_volume.errors import CheckpointError
from unet_volume.evaluation.scores import evaluate
from unet_volume.instances.labelling import label_instances
from unet_volume.models.checkpoint import read_checkpoint, save_model
from unet_volume.models.shipped import ShippedModel, check_shipped, shipped_models
from unet_volume.models.unet import UNet
from unet_volume.prediction.run import predict_volume

DATA = Path(__file__).parents[1] / "data" / "isbi2012"
SHIPPED = list(shipped_models().values())
MAX_BYTES = 20 * 2**20  # a file the repository carries
# Another CPU's kernels round differently: a few pixels near p = 0.5 flip, and a flipped pixel
# in a thin membrane can join two cells, so the Rand error gets a wider margin.
PIXEL_TOLERANCE, RAND_TOLERANCE = 0.002, 0.01


def shipped_ids() -> list[object]:
    return [pytest.param(model, id=model.name) for model in SHIPPED]


def test_shipped_models_include_the_isbi_membrane_model_as_its_record_describes_it() -> None:
    model = shipped_models()["isbi2012-membranes"]
    checkpoint = read_checkpoint(model.name)
    members = checkpoint.metadata["ensemble"]
    assert "ensemble of 2 networks" in model.record["made"][0] and len(members) == 2
    seeds = [member["training"]["config"]["seed"] for member in members]
    steps = {member["training"]["steps"] for member in members}
    assert f"trained: {steps.pop()} steps each" in model.record["made"][2] and not steps
    assert f"seeds {seeds[0]}, {seeds[1]}" in model.record["made"][2]
    assert checkpoint.config.ndim == 2 and checkpoint.config.depth == 4  # the paper's net


@pytest.mark.parametrize("shipped", shipped_ids())
def test_shipped_model_loads_by_name_and_is_the_recorded_file(shipped: ShippedModel) -> None:
    checkpoint = read_checkpoint(shipped.name)
    assert checkpoint.sha256 == shipped.sha256
    assert hashlib.sha256(shipped.path.read_bytes()).hexdigest() == shipped.sha256
    assert shipped.path.stat().st_size <= MAX_BYTES


@pytest.mark.parametrize("shipped", shipped_ids())
def test_shipped_model_scores_its_recorded_figures_on_slices_20_to_24(
    shipped: ShippedModel, tmp_path: Path, client: Client
) -> None:
    # A 2D net predicts each slice on its own: the substack 20-24 gives the whole stack's
    # prediction of those slices.
    image = tmp_path / "image.zarr"
    zarr.create_array(image, data=tifffile.imread(DATA / "train-volume.tif")[20:25])
    labels = tifffile.imread(DATA / "train-labels.tif")[20:25]
    out = tmp_path / "prediction.zarr"
    predict_volume(shipped.name, image, out, client=client, **shipped.predict_options)
    objects = tmp_path / "objects.zarr"
    label_instances(str(out), str(objects), client=client, watershed=shipped.watershed)
    recorded = shipped.figures("slices_20_24")
    segmentation = evaluate(out, labels).volume
    rand_error = evaluate(objects, labels).volume.rand_error  # of the objects
    assert segmentation.pixel_error == pytest.approx(recorded["pixel_error"], abs=PIXEL_TOLERANCE)
    assert rand_error == pytest.approx(recorded["rand_error"], abs=RAND_TOLERANCE)
    # The ISBI challenge's pixel error (the paper's): 1 - F-score of the interior pixels.
    challenge = recorded["challenge_pixel_error"]
    assert 1 - segmentation.dice == pytest.approx(challenge, abs=PIXEL_TOLERANCE)


def test_a_local_file_named_like_a_shipped_model_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    local = save_model(UNet(base_channels=4, depth=1), tmp_path / "isbi2012-membranes")
    monkeypatch.chdir(tmp_path)
    checkpoint = read_checkpoint("isbi2012-membranes")
    assert checkpoint.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert checkpoint.config.base_channels == 4


def test_a_shipped_file_that_is_not_the_recorded_one_is_refused() -> None:
    shipped = shipped_models()["isbi2012-membranes"]
    other = ShippedModel(shipped.name, shipped.file, "0" * 64, shipped.summary, shipped.record)
    with pytest.raises(CheckpointError, match=r"has sha256 \w{12}, its record says 000000000000"):
        check_shipped(other, shipped.path.read_bytes())
    check_shipped(shipped, shipped.path.read_bytes())  # the real record accepts the real file


def test_an_unknown_model_name_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path / "isbi-membranes")
    message = str(error.value)
    assert "does not exist" in message and "isbi2012-membranes" in message
    assert "unet-volume models" in message and "\n" not in message


def test_models_command_lists_each_model_with_its_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for shipped in SHIPPED:
        held_out = shipped.figures("held_out")
        assert f"{shipped.name}: " in out
        assert f"pixel error {held_out['pixel_error']:.4f}" in out
        challenge = (
            f"the ISBI challenge's 1 - F of the interior: {held_out['challenge_pixel_error']:.4f}"
        )
        assert challenge in out
        assert shipped.sha256[:12] in out and str(shipped.path) in out


def test_plan_takes_a_shipped_model_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(DATA / "train-volume.tif")
    code = main(["plan", image, str(tmp_path / "out.zarr"), "--model", "isbi2012-membranes"])
    assert code == 0, capsys.readouterr().err
    assert not (tmp_path / "out.zarr").exists()
