"""bioimage.io packages: what ``unet-volume export`` writes runs in bioimageio.core as here.

Marked ``zoo`` (the bioimageio extra; minutes, most of them the ONNX export and
bioimageio.core's own test): ``.ci/run`` runs them with ``-m zoo``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import xarray as xr
import yaml
from distributed import Client

from unet_volume.cli.main import main
from unet_volume.geometry import Box
from unet_volume.io.volumes import read_box
from unet_volume.models.checkpoint import TrainedInput, save_model
from unet_volume.models.unet import UNet
from unet_volume.prediction.run import predict_volume

pytestmark = [
    pytest.mark.zoo,
    # bioimageio.spec and .core leave a reader open on each file they hash or render (closed
    # when collected, with a ResourceWarning): theirs, not a leak of ours.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

EXIT_OK, EXIT_USAGE = 0, 2
REPO = Path(__file__).resolve().parent.parent
ISBI = REPO / "data" / "isbi2012" / "train-volume.tif"


def tiny_checkpoint(path: Path, ndim: int) -> Path:
    torch.manual_seed(ndim)
    net = UNet(base_channels=4, depth=2, ndim=ndim)
    trained = TrainedInput(mean=100.0, std=20.0)
    save_model(net, path, metadata={"classes": ["background", "cell"], **trained.to_metadata()})
    return path


def rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


@pytest.mark.parametrize("ndim", [2, 3])
def test_zoo_export_writes_a_package_that_bioimageio_core_reruns_in_every_format(
    tmp_path: Path, ndim: int, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_checkpoint(tmp_path / "model.pt", ndim)
    out = tmp_path / "model.zip"
    args = ["export", str(model), str(out), "--voxel-size", "50,4,4", "--units", "nm"]
    assert main(args) == EXIT_OK
    printed = capsys.readouterr().out
    # bioimageio.core's test ran every weights format against the test tensors and passed.
    assert "bioimageio test: passed (onnx, pytorch_state_dict, torchscript)" in printed
    description = rdf(out)
    assert set(description["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    (raw,), (probabilities,) = description["inputs"], description["outputs"]
    axes = "yx" if ndim == 2 else "zyx"
    space = [a for a in raw["axes"] if a["type"] == "space"]
    net = UNet(base_channels=4, depth=2, ndim=ndim)
    # The valid sizes: the smallest valid input and steps of 2^depth; the output is the input
    # minus twice the halo, at the training data's voxel size.
    assert [a["id"] for a in space] == list(axes)
    assert [a["size"] for a in space] == [{"min": 44, "step": 4}] * ndim
    assert [a["scale"] for a in space] == [50.0, 4.0, 4.0][3 - ndim :]
    assert {a["unit"] for a in space} == {"nanometer"}
    out_space = [a for a in probabilities["axes"] if a["type"] == "space"]
    assert [a["size"]["offset"] for a in out_space] == [-2 * h for h in net.halo]
    assert net.output_shape((44,) * ndim) == (44 - 2 * net.halo[0],) * ndim
    # The normalisation training used, as the spec's own preprocessing step.
    steps = {step["id"]: step.get("kwargs") for step in raw["preprocessing"]}
    assert steps["fixed_zero_mean_unit_variance"] == {"mean": 100.0, "std": 20.0}
    assert probabilities["postprocessing"][0]["id"] == "softmax"
    with zipfile.ZipFile(out) as z:
        assert b"unet_volume" not in z.read("architecture.py").split(b'"""')[-1]


def test_zoo_shipped_model_package_passes_and_core_predicts_as_unet_volume_predict(
    tmp_path: Path, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "isbi.zip"
    args = ["export", "isbi2012-membranes", str(out), "--sample", str(ISBI)]
    assert main(args) == EXIT_OK
    assert "bioimageio test: passed (onnx, pytorch_state_dict, torchscript)" in (
        capsys.readouterr().out
    )
    description = rdf(out)
    assert description["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["networks"] == 2
    space = [a for a in description["inputs"][0]["axes"] if a["type"] == "space"]
    assert [(a["scale"], a["unit"]) for a in space] == [(4.0, "nanometer")] * 2
    assert description["config"]["unet_volume"]["trained_input"]["label_offset"] == [0.6, 0.2]

    # Two ISBI slices, 132 x 132: unet-volume predicts them (mirrored at their borders) ...
    crop = tifffile.imread(ISBI)[20:22, 100:232, 200:332]
    tifffile.imwrite(tmp_path / "crop.tif", crop)
    predict_volume(
        "isbi2012-membranes",
        tmp_path / "crop.tif",
        tmp_path / "out.zarr",
        client=client,
        label_offset=(0.0, 0.0),  # the spec has no step for it
        tta=False,
        output_dtype="float32",
    )
    ours = xr.open_zarr(tmp_path / "out.zarr")["probabilities"].values

    # ... and bioimageio.core predicts each slice mirrored by the halo, as our tiles read it.
    from bioimageio.core import load_model_description, predict

    package = load_model_description(out)
    halo = 92
    for z in range(2):
        box = Box((z, -halo, -halo), (z + 1, 132 + halo, 132 + halo))
        padded = read_box(crop, box)[0, 0].astype(np.float32)  # (316, 316): 188 + 8 x 16
        sample = predict(model=package, inputs=padded[None, None])
        theirs = sample.members["probabilities"].data.values[0]
        assert theirs.shape == (2, 132, 132)
        np.testing.assert_allclose(theirs, ours[:, z], atol=1e-5)


def test_zoo_export_refuses_bad_arguments_in_one_line_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_checkpoint(tmp_path / "model.pt", 2)
    cases = {
        "model.tar": [],
        "a.zip": ["--voxel-size", "4,4"],
        "b.zip": ["--voxel-size", "50,4,4", "--units", "parsecs per fortnight"],
        "c.zip": ["--sample", str(tmp_path / "missing.tif")],
    }
    for name, extra in cases.items():
        assert main(["export", str(model), str(tmp_path / name), *extra]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith("unet-volume export: error: ") and err.count("\n") == 1, err
        assert not (tmp_path / name).exists()
    assert main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "d.zip")]) == EXIT_USAGE
    (tmp_path / "e.zip").write_bytes(b"kept")
    assert main(["export", str(model), str(tmp_path / "e.zip")]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "e.zip").read_bytes() == b"kept"
