"""Checkpoints: a U-Net's weights together with what is needed to use and trust them.

A checkpoint is one file written by ``torch.save``: a dict with a format tag and version, the
:class:`~unet_volume.models.unet.UNetConfig` as plain values, free metadata as a JSON string
(normalisation mean/std, class names, training recipe, metrics) and the state dict. Like
torchvision's ``Weights`` records, it carries everything needed to rebuild the exact model.

Files are read only with ``torch.load(weights_only=True)``: a checkpoint cannot run code when it
is loaded, whoever wrote it. Anything that is not one of our checkpoints (a TIFF, a plain state
dict, a truncated download, a missing path) raises :class:`~unet_volume.errors.CheckpointError`
with a one-line message. The bytes variants serve the prediction engine, which ships a
checkpoint to each Dask worker once and builds the model there.

Usage:

>>> model = UNet(depth=2, base_channels=4)
>>> data = checkpoint_bytes(model, {"classes": ["background", "cell"]})
>>> model_from_bytes(data).config == model.config
True
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unet_volume.errors import CheckpointError, InputError
from unet_volume.io.locations import location, read_whole, write_whole
from unet_volume.label_offset import Offset3, spatial_offset
from unet_volume.models.ensemble import Ensemble
from unet_volume.models.shipped import check_shipped, model_names, shipped_model
from unet_volume.models.unet import UNet, UNetConfig

FORMAT = "unet-volume-checkpoint"
VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"
_FIX = "pass a file written by `unet-volume train` or `save_model`"

StateDict = dict[str, torch.Tensor]
Network = UNet | Ensemble


@dataclass(frozen=True)
class TrainedInput:
    """How training saw its input, which prediction must repeat: the intensity normalisation
    (``(x - mean) / std``) and the label offset (where the image's boundaries sat against the
    labels', :mod:`unet_volume.label_offset`; empty: none).

    Written by training as the checkpoint's ``input`` record and read here alone
    (:meth:`of`), by prediction, fine-tuning, resumed runs and ensembles. Checkpoints written
    before kept the two apart (``normalization``, and the recipe's ``label_offset``), where
    :meth:`of` still finds them.

    >>> TrainedInput.of({"normalization": {"mean": 127.5, "std": 64}})
    TrainedInput(mean=127.5, std=64.0, label_offset=())
    >>> TrainedInput.of(TrainedInput(1.0, 2.0, (0.6, 0.2)).to_metadata()).label_offset
    (0.6, 0.2)
    """

    mean: float = 0.0
    std: float = 1.0
    label_offset: tuple[float, ...] = ()

    KEY = "input"
    """The record's key in a checkpoint's metadata."""

    def to_metadata(self) -> dict[str, Any]:
        """The record as a checkpoint's metadata holds it (plain JSON values)."""
        record = {"mean": self.mean, "std": self.std, "label_offset": list(self.label_offset)}
        return {self.KEY: record}

    @classmethod
    def of(cls, metadata: Mapping[str, Any]) -> TrainedInput | None:
        """The record in a checkpoint's ``metadata``; None for a network training never wrote
        (e.g. :func:`save_model` of a new one): it takes its input as it comes."""
        if (record := metadata.get(cls.KEY)) is not None:
            offset = record.get("label_offset") or ()
            return cls(float(record["mean"]), float(record["std"]), tuple(map(float, offset)))
        norm = metadata.get("normalization")
        if not norm:
            return None
        offset = metadata.get("training", {}).get("config", {}).get("label_offset") or ()
        return cls(float(norm["mean"]), float(norm["std"]), tuple(map(float, offset)))

    def read_offset(self, override: Sequence[float] | None = None) -> Offset3:
        """The ``(z, y, x)`` offset to read the image with: ``override`` if given, else this."""
        z, y, x = spatial_offset(self.label_offset if override is None else override)
        return (z, y, x)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read from disk, validated against its own config.

    ``num_params`` counts the parameters the config implies (buffers such as batch-norm
    statistics excluded); ``sha256`` is the hash of the file's bytes, to pin a run to its model.
    ``members`` is the number of networks: 1, or an :class:`~unet_volume.models.ensemble.Ensemble`'s
    (each of ``config``).
    """

    config: UNetConfig
    state_dict: StateDict
    metadata: dict[str, Any]
    num_params: int
    sha256: str
    members: int = 1

    def network(self, index: int) -> Checkpoint:
        """Network ``index`` of an ensemble as a checkpoint of its own (the same file's sha256;
        the ensemble's metadata): what ``train --init`` fine-tunes of an ensemble."""
        if not 0 <= index < self.members:
            raise InputError(f"network {index} of {self.members}: pass 0 to {self.members - 1}")
        if self.members == 1:
            return self
        prefix = f"members.{index}."
        weights = {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        return Checkpoint(
            self.config, weights, self.metadata, self.num_params // self.members, self.sha256
        )

    @property
    def trained_input(self) -> TrainedInput:
        """How training saw the input (:class:`TrainedInput`); as it comes if untrained."""
        return TrainedInput.of(self.metadata) or TrainedInput()

    def to_model(self) -> Network:
        """A new model with these weights, on their device, in eval mode (dropout off)."""
        with torch.device("meta"):  # no memory and no init: the weights come next
            model = _network(self.config, self.members)
        # Copies (models never share weights), in the model's float32 when stored narrower.
        weights = {k: _widened(v) for k, v in self.state_dict.items()}
        model.load_state_dict(weights, assign=True)
        return model.eval()


def _network(config: UNetConfig, members: int) -> Network:
    return UNet.from_config(config) if members == 1 else Ensemble.from_config(config, members)


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor``, float32 if it is a narrower float (float16 or bfloat16 storage)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.to(torch.float32)  # a new tensor already
    return tensor.clone()


def _check_json(value: object, where: str) -> None:
    """Raise InputError unless ``value`` survives a JSON round trip unchanged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError(f"{where} has key {key!r}, not a str; JSON keys must be str")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise InputError(
        f"{where} is a {type(value).__name__}, which JSON cannot hold exactly; "
        "pass plain dict/list/str/int/float/bool/None values (e.g. array.tolist(), list(tuple))"
    )


def checkpoint_bytes(
    model: Network,
    metadata: dict[str, Any] | None = None,
    *,
    weights_dtype: torch.dtype | None = None,
) -> bytes:
    """The bytes of a checkpoint of ``model``: what :func:`save_model` writes.

    ``weights_dtype=torch.float16`` stores the floating weights at half the size (a shipped
    model within its size limit); they are read back as float32.
    """
    metadata = {} if metadata is None else metadata
    if weights_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise InputError(
            f"weights_dtype {weights_dtype} is not a storage type for weights; "
            "pass torch.float32, torch.float16 or torch.bfloat16"
        )
    if not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
    _check_json(metadata, "metadata")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "metadata": json.dumps(metadata),
        **({"members": len(model.members)} if isinstance(model, Ensemble) else {}),
        # On CPU, so a checkpoint written on a GPU loads anywhere.
        "state_dict": {
            k: _stored(v.detach().cpu(), weights_dtype) for k, v in model.state_dict().items()
        },
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def save_model(
    model: Network,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path | str:
    """Write a checkpoint of ``model`` to ``path`` (a file or an fsspec URL) and return where
    (``weights_dtype``: as :func:`checkpoint_bytes`).

    The checkpoint appears whole (:func:`~unet_volume.io.locations.write_whole`): a crash
    mid-write never leaves a truncated checkpoint under the final name.
    """
    write_whole(path, checkpoint_bytes(model, metadata, weights_dtype=weights_dtype))
    return location(path)


def read_checkpoint_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the checkpoint at ``path``, validated, e.g. to ship to Dask workers.

    Validated here so that a bad file is reported with its path, not as anonymous bytes.
    """
    data = _read_file(path)
    _parse(data, str(path), "cpu")
    return data


def read_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Read and validate the checkpoint at ``path``, tensors on ``device``."""
    return _parse(_read_file(path), str(path), device)


def checkpoint_from_bytes(data: bytes, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Validate checkpoint ``data`` (from :func:`checkpoint_bytes`), tensors on ``device``."""
    return _parse(data, "checkpoint bytes", device)


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Network:
    """The model saved at ``path``, on ``device``, in eval mode (call ``.train()`` to train on)."""
    return read_checkpoint(path, device=device).to_model()


def model_from_bytes(data: bytes, *, device: str | torch.device = "cpu") -> Network:
    """The model in checkpoint ``data`` (from :func:`checkpoint_bytes`), in eval mode."""
    return checkpoint_from_bytes(data, device=device).to_model()


def _read_file(model: str | os.PathLike[str]) -> bytes:
    """The bytes of the checkpoint at ``model`` (a path or an fsspec URL), or of the shipped
    model of that name."""
    shipped = shipped_model(model)
    where = shipped.path if shipped else location(model)
    if isinstance(where, Path) and where.is_dir():
        raise CheckpointError(f"checkpoint {where} is not a file; {_FIX}")
    data = read_whole(where)
    if data is None:
        raise CheckpointError(
            f"checkpoint {where} does not exist; {_FIX}, or a shipped model's name "
            f"({model_names()}; see `unet-volume models`)"
        )
    if shipped:
        check_shipped(shipped, data)
    return data


def _load_failure(error: Exception) -> str:
    """One line on why ``torch.load`` failed, from its (often many-line) message."""
    lines = str(error).splitlines()
    refused = [line.strip() for line in lines if "Unsupported global" in line]
    if refused:  # the weights-only unpickler met a class or function: code, not weights
        return f"it holds objects that are not weights: {refused[0]}"
    first = lines[0].strip() if lines else ""
    return f"damaged or truncated archive: {type(error).__name__}: {first[:100]}"


def _not_ours(source: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{source} is not a unet-volume checkpoint ({reason}); {_FIX}")


def _parse(data: bytes, source: str, device: str | torch.device) -> Checkpoint:
    """Unpickle ``data`` with torch's weights-only unpickler and validate every field."""
    if not data.startswith(_ZIP_MAGIC):  # torch.save writes a zip archive
        raise _not_ours(source, f"not a torch.save archive; it starts with {data[:8]!r}")
    try:
        payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as error:  # torch raises many types for foreign or damaged files
        raise _not_ours(source, _load_failure(error)) from error
    if not isinstance(payload, dict):
        raise _not_ours(source, f"it holds a {type(payload).__name__}, not a dict")
    if payload.get("format") != FORMAT:
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise _not_ours(source, "it is a plain state dict without the model's config")
        raise _not_ours(source, f"format tag {payload.get('format')!r}, expected {FORMAT!r}")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{source} is a version {payload.get('version')!r} checkpoint but this unet-volume "
            f"reads version {VERSION}; use the unet-volume release that wrote it"
        )
    config = _read_config(payload.get("config"), source)
    metadata = _read_metadata(payload.get("metadata"), source)
    members = payload.get("members", 1)
    if not (isinstance(members, int) and members >= 1):
        raise CheckpointError(f"{source} is damaged: its members {members!r} is not a count")
    state_dict = _read_state_dict(payload.get("state_dict"), config, members, source)
    with torch.device("meta"):
        num_params = _network(config, members).num_params()
    sha256 = hashlib.sha256(data).hexdigest()
    return Checkpoint(config, state_dict, metadata, num_params, sha256, members)


def _read_config(value: object, source: str) -> UNetConfig:
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise CheckpointError(f"{source} is damaged: its config is a {kind}; {_FIX}")
    try:
        return UNetConfig.from_dict(value)
    except InputError as error:
        raise CheckpointError(f"{source} has an invalid config ({error}); {_FIX}") from error


def _read_metadata(value: object, source: str) -> dict[str, Any]:
    try:
        metadata = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{source} is damaged: its metadata is not a JSON object; {_FIX}")
    return metadata


def _read_state_dict(value: object, config: UNetConfig, members: int, source: str) -> StateDict:
    """The state dict, checked key by key and shape by shape against ``config``'s network (or
    ensemble of ``members``)."""
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise CheckpointError(f"{source} is damaged: its state dict is not tensors; {_FIX}")
    with torch.device("meta"):  # the expected shapes, without allocating or initialising
        expected = {k: v.shape for k, v in _network(config, members).state_dict().items()}
    found = {k: v.shape for k, v in value.items()}
    if found != expected:
        differ = sorted(set(found).symmetric_difference(expected)) or sorted(
            k for k in expected if found[k] != expected[k]
        )
        raise CheckpointError(
            f"{source} is damaged: its weights do not fit its config {config} "
            f"(first mismatch: {differ[0]!r}); {_FIX}"
        )
    return value


def save_ensemble(
    checkpoints: list[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    *,
    weights_dtype: torch.dtype | None = None,
) -> Path | str:
    """Write one checkpoint at ``path`` of the :class:`~unet_volume.models.ensemble.Ensemble` of the
    networks at ``checkpoints`` (files or shipped names), e.g. one recipe's seeds.

    The networks must share a config, classes and label offset (prediction reads the image as
    they were trained to). The metadata is the first's, its normalisation the ensemble's, with
    ``ensemble``: each member's sha256 and training record.
    """
    read = [read_checkpoint(c) for c in checkpoints]
    for name, found in zip(checkpoints, read, strict=True):
        if found.members != 1:
            raise InputError(f"{name} is an ensemble already; pass its members' checkpoints")
    recorded = {
        "classes": lambda c: c.metadata.get("classes"),
        "label_offset": lambda c: list(c.trained_input.read_offset()),  # as prediction reads it
    }
    for what, value in recorded.items():
        values = {json.dumps(value(c)) for c in read}
        if len(values) > 1:
            raise InputError(
                f"the networks differ in {what} ({', '.join(sorted(values))}); an ensemble's "
                "members must be of one recipe: pass networks trained alike"
            )
    norms = [trained_normalization(c, str(n)) for c, n in zip(read, checkpoints, strict=True)]
    ensemble = Ensemble([c.to_model() for c in read], norms)  # type: ignore[misc]
    metadata = copy.deepcopy(read[0].metadata)
    metadata["ensemble"] = [
        {"sha256": c.sha256, "training": c.metadata.get("training")} for c in read
    ]
    return save_model(ensemble, path, metadata=metadata, weights_dtype=weights_dtype)


def trained_normalization(checkpoint: Checkpoint, name: str) -> tuple[float, float]:
    """The input (mean, std) that training recorded in ``checkpoint`` (called ``name`` in the
    error when it has none)."""
    trained = TrainedInput.of(checkpoint.metadata)
    if trained is None:
        raise CheckpointError(f"{name} has no normalization; it was not written by training")
    return trained.mean, trained.std
