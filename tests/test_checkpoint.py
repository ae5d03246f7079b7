"""Specification of checkpoints: exact round trips, no code execution, clear refusals."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from unet_volume.errors import CheckpointError, InputError
from unet_volume.models.checkpoint import (
    FORMAT,
    checkpoint_bytes,
    checkpoint_from_bytes,
    load_model,
    model_from_bytes,
    read_checkpoint,
    read_checkpoint_bytes,
    save_model,
)
from unet_volume.models.unet import UNet, UNetConfig

METADATA: dict[str, Any] = {
    "normalization": {"mean": 0.25, "std": 0.125},
    "classes": ["background", "cell"],
    "recipe": {"optimizer": "sgd", "momentum": 0.99, "w0": 10, "sigma": 5.0},
    "metrics": {"rand_error": 0.0382, "nan_is_kept": float("nan")},
    "note": None,
}


def trained_unet(**config: Any) -> UNet:
    """A small net whose weights and batch-norm statistics differ from a fresh init.

    8 base channels: with 2, dead ReLUs could make two different nets agree by accident.
    """
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=8, **config)
    with torch.no_grad():
        net.train()(torch.randn(2, net.config.in_channels, *(44,) * net.config.ndim))
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net.eval()


def untrained_unet() -> UNet:
    """For tests about files rather than weights."""
    return UNet(depth=2, base_channels=2)


def assert_same_outputs(a: UNet, b: UNet) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, a.config.in_channels, *a.input_shape_for((12,) * a.config.ndim))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="2d"),
        pytest.param({"ndim": 3, "in_channels": 2, "num_classes": 3}, id="3d"),
        pytest.param({"batch_norm": True, "dropout": 0.0}, id="batch-norm"),
    ],
)
def test_checkpoint_round_trip_gives_identical_outputs_config_and_metadata(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    net = trained_unet(**config)
    path = save_model(net, tmp_path / "model.pt", metadata=METADATA)
    loaded = load_model(path)
    assert loaded.config == net.config
    assert not loaded.training  # ready to predict: dropout off, batch norm frozen
    assert_same_outputs(net, loaded)
    checkpoint = read_checkpoint(path)
    assert checkpoint.config == net.config
    # NaN != NaN, so compare the JSON text; every other value compares exactly.
    assert repr(checkpoint.metadata) == repr(METADATA)
    assert checkpoint.num_params == net.num_params()


def test_checkpoint_bytes_round_trip_like_a_file() -> None:
    net = trained_unet()
    loaded = model_from_bytes(checkpoint_bytes(net, {"classes": ["background", "cell"]}))
    assert loaded.config == net.config
    assert_same_outputs(net, loaded)


def test_checkpoint_engine_path_ships_validated_file_bytes(tmp_path: Path) -> None:
    # predict: read the file once on the client, send the bytes, build the model per worker.
    net = trained_unet()
    path = save_model(net, tmp_path / "model.pt", metadata=METADATA)
    data = read_checkpoint_bytes(path)
    assert data == path.read_bytes()
    checkpoint = checkpoint_from_bytes(data)
    assert checkpoint.sha256 == read_checkpoint(path).sha256
    assert_same_outputs(net, checkpoint.to_model())


def test_checkpoint_to_model_builds_independent_models() -> None:
    checkpoint = checkpoint_from_bytes(checkpoint_bytes(trained_unet()))
    a, b = checkpoint.to_model(), checkpoint.to_model()
    with torch.no_grad():
        next(a.parameters()).zero_()  # e.g. fine-tuning one of them
    assert next(b.parameters()).any()
    assert torch.equal(next(b.parameters()), checkpoint.state_dict["encoder.0.0.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpoint_stores_weights_narrower_and_reads_them_back_as_float32(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    # A shipped model within its size limit: half the bytes, the weights rounded once.
    net = trained_unet(batch_norm=True)
    full = save_model(net, tmp_path / "full.pt")
    half = save_model(net, tmp_path / "half.pt", weights_dtype=dtype)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_model(half)
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        expected = a.to(dtype).to(a.dtype) if a.is_floating_point() else a
        assert b.dtype == a.dtype and torch.equal(b, expected), name
    x = torch.randn(1, 1, *net.input_shape_for((12, 12)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0.05, atol=0.05)


def test_checkpoint_refuses_a_weights_dtype_that_is_not_a_float(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"weights_dtype torch\.int8 .*pass torch\.float32"):
        save_model(untrained_unet(), tmp_path / "model.pt", weights_dtype=torch.int8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_model_maps_a_cpu_checkpoint_onto_the_gpu(tmp_path: Path) -> None:
    net = trained_unet()
    loaded = load_model(save_model(net, tmp_path / "model.pt"), device="cuda")
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b.cpu()), name
    x = torch.randn(1, 1, *net.input_shape_for((12, 12)))
    with torch.no_grad():
        assert loaded(x.cuda()).shape == net(x).shape


def test_checkpoint_loaded_model_can_train_on() -> None:
    loaded = model_from_bytes(checkpoint_bytes(trained_unet()))
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())


def test_read_checkpoint_sha256_is_the_hash_of_the_file(tmp_path: Path) -> None:
    path = save_model(untrained_unet(), tmp_path / "model.pt")
    assert read_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_model_leaves_only_the_checkpoint(tmp_path: Path) -> None:
    save_model(untrained_unet(), tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary files


@pytest.mark.parametrize(
    "metadata, message",
    [
        pytest.param({"mean": (0.5,)}, r"metadata\['mean'\] is a tuple", id="tuple"),
        pytest.param({"ids": {1, 2}}, r"metadata\['ids'\] is a set", id="set"),
        pytest.param({"per_class": {1: 0.5}}, r"metadata\['per_class'\] has key 1", id="int-key"),
        pytest.param({"path": Path("x")}, r"metadata\['path'\] is a PosixPath", id="path"),
    ],
)
def test_save_model_refuses_metadata_that_json_cannot_hold(
    tmp_path: Path, metadata: dict[str, Any], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        save_model(untrained_unet(), tmp_path / "model.pt", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


# --- loading never runs code ---------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: stands in for any code a hostile file might run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def as_raw_pickle(marker: Path) -> bytes:
    return pickle.dumps({"format": FORMAT, "state_dict": Payload(marker)})


def as_torch_archive(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": 1, "state_dict": Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("write", [as_raw_pickle, as_torch_archive])
def test_load_model_never_executes_pickled_code(
    tmp_path: Path, write: Callable[[Path], bytes]
) -> None:
    probe, marker = tmp_path / "probe", tmp_path / "marker"
    pickle.loads(write(probe)) if write is as_raw_pickle else torch.load(
        io.BytesIO(write(probe)), weights_only=False
    )
    assert probe.exists()  # the payload is live: an unrestricted unpickler runs it
    path = tmp_path / "model.pt"
    path.write_bytes(write(marker))
    with pytest.raises(CheckpointError, match=r"model\.pt is not a unet-volume checkpoint"):
        load_model(path)
    assert not marker.exists()


# --- anything else is refused with one line ------------------------------------------------


def _checkpoint_payload(**changes: Any) -> bytes:
    payload = {
        "format": FORMAT,
        "version": 1,
        "config": UNetConfig(depth=2, base_channels=2).to_dict(),
        "metadata": "{}",
        "state_dict": UNet(depth=2, base_channels=2).state_dict(),
        **changes,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _state_dict_only() -> bytes:
    buffer = io.BytesIO()
    torch.save(UNet(depth=2, base_channels=2).state_dict(), buffer)
    return buffer.getvalue()


NOT_CHECKPOINTS = [
    pytest.param(lambda: b"", "not a torch.save archive", id="empty"),
    pytest.param(lambda: b"depth: 4\n", "not a torch.save archive", id="text"),
    pytest.param(lambda: b"II*\x00\x08\x00\x00\x00" + bytes(64), r"starts with b'II\*", id="tiff"),
    pytest.param(_state_dict_only, "plain state dict without the model's config", id="state-dict"),
    pytest.param(lambda: _checkpoint_payload()[:1000], "damaged or truncated", id="truncated"),
    pytest.param(lambda: _checkpoint_payload(format="other"), "format tag 'other'", id="format"),
    pytest.param(lambda: _checkpoint_payload(version=2), "version 2 checkpoint", id="version"),
    pytest.param(lambda: _checkpoint_payload(config={"depth": 0}), "depth", id="bad-config"),
    pytest.param(lambda: _checkpoint_payload(metadata="[1]"), "metadata", id="bad-metadata"),
    pytest.param(
        lambda: _checkpoint_payload(config=UNetConfig(depth=3, base_channels=2).to_dict()),
        "weights do not fit its config",
        id="weights-of-another-config",
    ),
]


@pytest.mark.parametrize("make, reason", NOT_CHECKPOINTS)
def test_read_checkpoint_refuses_what_is_not_our_checkpoint(
    tmp_path: Path, make: Callable[[], bytes], reason: str
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(make())
    with pytest.raises(CheckpointError, match=reason) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "; " in message and "\n" not in message  # value; fix


@pytest.mark.parametrize("make, reason", NOT_CHECKPOINTS)
def test_read_checkpoint_bytes_refuses_a_bad_file_naming_its_path(
    tmp_path: Path, make: Callable[[], bytes], reason: str
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(make())
    with pytest.raises(CheckpointError, match=f"{path}.*{reason}"):
        read_checkpoint_bytes(path)


@pytest.mark.parametrize("make, reason", NOT_CHECKPOINTS)
def test_model_from_bytes_refuses_what_is_not_our_checkpoint(
    make: Callable[[], bytes], reason: str
) -> None:
    with pytest.raises(CheckpointError, match=reason):
        model_from_bytes(make())


def test_read_checkpoint_says_a_missing_path_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        load_model(tmp_path / "missing.pt")


def test_read_checkpoint_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a file"):
        read_checkpoint(tmp_path)
