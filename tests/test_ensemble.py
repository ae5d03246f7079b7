"""Ensembles: networks of one recipe in one checkpoint, predicting their mean probabilities."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import Client

from unet_volume.cli.main import main
from unet_volume.errors import CheckpointError, InputError
from unet_volume.models.checkpoint import read_checkpoint, save_ensemble, save_model
from unet_volume.models.config import UNetConfig
from unet_volume.models.unet import UNet
from unet_volume.output.prediction import open_prediction
from unet_volume.prediction.run import predict_volume
from unet_volume.testing import blob_volume, write_zarr
from unet_volume.training.loop import TrainConfig, train
from unet_volume.training.start import with_network_of

TINY = {"depth": 2, "base_channels": 8, "dropout": 0.0}


def member(
    path: Path, weights_seed: int, normalization: tuple[float, float], **training: Any
) -> Path:
    """A network of its own weights (``weights_seed``), trained on input normalised by
    ``normalization`` (mean, std), as training records it."""
    torch.manual_seed(weights_seed)
    net = UNet(**TINY)
    mean, std = normalization
    metadata = {
        "normalization": {"mean": mean, "std": std},
        "classes": ["background", "cell"],
        "training": {"config": {"label_offset": None, **training}},
    }
    return save_model(net, path, metadata=metadata)


def probabilities(model: Path, image: str, out: Path, client: Client) -> np.ndarray:
    predict_volume(
        str(model), image, out, block_shape=(1, 16, 32), output_dtype="float32", client=client
    )
    return open_prediction(str(out)).probabilities.values


def test_ensemble_predicts_the_mean_of_its_networks_each_on_its_own_normalization(
    client: Client, tmp_path: Path
) -> None:
    a = member(tmp_path / "a.pt", 1, (100.0, 40.0))
    b = member(tmp_path / "b.pt", 2, (80.0, 60.0))
    ensemble = save_ensemble([a, b], tmp_path / "e.pt")
    image = write_zarr(tmp_path / "in.zarr", blob_volume((2, 40, 36)))
    got = probabilities(ensemble, image, tmp_path / "e.zarr", client)
    each = [probabilities(m, image, tmp_path / f"{m.stem}.zarr", client) for m in (a, b)]
    # Each network read the input as it was trained to (its own mean and std): no other
    # normalisation gives the mean of their own predictions. float32 sums: a tolerance.
    np.testing.assert_allclose(got, (each[0] + each[1]) / 2, rtol=0, atol=1e-5)
    assert np.abs(each[0] - each[1]).max() > 0.05  # the networks differ: the mean is a test


def test_ensemble_checkpoint_holds_its_networks_and_their_records(tmp_path: Path) -> None:
    paths = [member(tmp_path / f"{k}.pt", k, (100.0, 40.0), seed=k) for k in range(3)]
    args = ["ensemble", *map(str, paths), "--out", str(tmp_path / "e.pt"), "--float16"]
    assert main(args) == 0
    found = read_checkpoint(tmp_path / "e.pt")
    one = read_checkpoint(paths[0])
    assert found.members == 3 and found.config == one.config
    assert found.num_params == 3 * one.num_params
    records = found.metadata["ensemble"]
    assert [r["sha256"] for r in records] == [read_checkpoint(p).sha256 for p in paths]
    assert [r["training"]["config"]["seed"] for r in records] == [0, 1, 2]
    assert found.metadata["normalization"] == one.metadata["normalization"]
    assert (tmp_path / "e.pt").stat().st_size < 0.6 * 3 * paths[0].stat().st_size  # float16


@pytest.mark.parametrize(
    ("second", "message"),
    [
        pytest.param({"net": {"base_channels": 4}}, r"must share one config", id="another-network"),
        pytest.param(
            {"training": {"label_offset": [0.6, 0.2]}}, r"differ in label_offset", id="offset"
        ),
    ],
)
def test_ensemble_refuses_networks_of_other_recipes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], second: dict[str, Any], message: str
) -> None:
    a = member(tmp_path / "a.pt", 1, (100.0, 40.0))
    torch.manual_seed(2)
    net = UNet(**{**TINY, **second.get("net", {})})
    training = {"config": {"label_offset": None, **second.get("training", {})}}
    metadata = {"normalization": {"mean": 0.0, "std": 1.0}, "classes": ["background", "cell"]}
    b = save_model(net, tmp_path / "b.pt", metadata={**metadata, "training": training})
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "e.pt")]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert error.startswith("unet-volume ensemble: error: ")
    with pytest.raises(InputError, match=message):
        save_ensemble([a, b], tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()


def test_ensemble_is_no_member_training_fine_tunes_its_first_network_and_resumes_none(
    tmp_path: Path,
) -> None:
    paths = [member(tmp_path / f"{k}.pt", k, (100.0, 40.0)) for k in range(2)]
    ensemble = save_ensemble(paths, tmp_path / "e.pt")
    with pytest.raises(InputError, match="is an ensemble already; pass its members"):
        save_ensemble([ensemble, paths[0]], tmp_path / "f.pt")
    config = TrainConfig(steps=1, tile_output=(1, 12, 12), model=UNetConfig(**TINY))
    _, start = with_network_of(ensemble, config)  # what --init fine-tunes
    first = read_checkpoint(paths[0]).state_dict
    assert start.members == 1 and start.state_dict.keys() == first.keys()
    assert all(torch.equal(start.state_dict[k], first[k]) for k in first)
    image = write_zarr(tmp_path / "i.zarr", blob_volume((2, 48, 48)))
    labels = write_zarr(tmp_path / "l.zarr", (blob_volume((2, 48, 48)) > 120).astype(np.uint8))
    config = dataclasses.replace(config, weight_map=False)
    assert train(image, labels, tmp_path / "m.pt", config, init=ensemble).steps == 1
    with pytest.raises(InputError, match=r"--resume .* is an ensemble of 2 networks and a run"):
        train(image, labels, tmp_path / "n.pt", config, resume=ensemble)
    assert not (tmp_path / "n.pt").exists()


def test_ensemble_checkpoint_with_a_bad_member_count_is_refused(tmp_path: Path) -> None:
    paths = [member(tmp_path / f"{k}.pt", k, (100.0, 40.0)) for k in range(2)]
    payload = torch.load(save_ensemble(paths, tmp_path / "e.pt"), weights_only=True)
    payload["members"] = 3  # the weights of 2
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    (tmp_path / "bad.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="is damaged: its weights do not fit its config"):
        read_checkpoint(tmp_path / "bad.pt")
