"""The models that ship with the package, by name: ``--model isbi2012-membranes``.

A user who installs unet-volume should segment EM without training first, and a model named
in a command must be the model that was measured. So each shipped checkpoint has a record in
``shipped/models.json``: its file, its sha256 (checked on every load by name), the recipe and
steps that made it, the data it saw, and its figures: a held-out score from the same recipe
trained without slices 20-24, and the shipped model's own score on 20-24, which a test
reproduces.

Any path that exists wins over a name, so a local file called like a shipped model is never
shadowed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from unet_volume.errors import CheckpointError
from unet_volume.instances.watershed import WatershedConfig

SHIPPED_DIR = Path(__file__).parent
INDEX = SHIPPED_DIR / "models.json"


@dataclass(frozen=True)
class ShippedModel:
    """One shipped checkpoint and its record (``models.json``)."""

    name: str
    file: str
    sha256: str
    summary: str
    record: dict[str, Any]

    @property
    def path(self) -> Path:
        return SHIPPED_DIR / self.file

    def figures(self, key: str) -> dict[str, float]:
        """The figures of one scoring in the record, e.g. ``held_out`` or ``slices_20_24``."""
        return dict(self.record["figures"][key])

    @property
    def predict_options(self) -> dict[str, Any]:
        """The prediction options it was measured with (e.g. ``tta``, ``threshold``)."""
        return dict(self.record.get("predict", {}))

    @property
    def watershed(self) -> WatershedConfig:
        """The watershed that its Rand error was measured with."""
        segment = self.record["segment"]
        return WatershedConfig(segment["threshold"], segment["seed_threshold"], segment["cover"])

    def commands(self) -> list[str]:
        """The two commands that give its measured read-out."""
        predict = self.predict_options
        flags = " --tta" if predict.get("tta") else ""
        if predict.get("threshold") is not None:
            flags += f" --threshold {predict['threshold']:g}"
        ws = self.watershed
        cover = " --cover" if ws.cover else ""
        return [
            f"unet-volume predict IMAGE OUT.zarr --model {self.name}{flags}",
            f"unet-volume segment OUT.zarr OUT.zarr/labels/cells --watershed{cover} "
            f"--threshold {ws.threshold:g} --seed-threshold {ws.seed_threshold:g}",
        ]


@cache
def shipped_models() -> dict[str, ShippedModel]:
    """The shipped models by name, in the order of the index."""
    if not INDEX.exists():
        return {}
    entries = json.loads(INDEX.read_text())
    return {
        name: ShippedModel(name, e["file"], e["sha256"], e["summary"], e)
        for name, e in entries.items()
    }


def shipped_model(model: str | os.PathLike[str]) -> ShippedModel | None:
    """The shipped model that ``model`` names, or None where it is a path (or no name).

    A name counts only when no such path exists, so a local file is never shadowed.
    """
    shipped = shipped_models().get(str(model))
    if shipped is None or Path(model).exists():
        return None
    return shipped


def check_shipped(shipped: ShippedModel, data: bytes) -> None:
    """Refuse a shipped file whose bytes are not the ones its record measured."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != shipped.sha256:
        raise CheckpointError(
            f"shipped model {shipped.name!r} at {shipped.path} has sha256 {digest[:12]}, its "
            f"record says {shipped.sha256[:12]}; reinstall unet-volume"
        )


def model_file(model: str | os.PathLike[str]) -> str:
    """Where the checkpoint that ``model`` names lives: the shipped file, or ``model`` itself."""
    shipped = shipped_model(model)
    return str(shipped.path if shipped else model)


def describe(shipped: ShippedModel) -> list[str]:
    """What ``unet-volume models`` prints for one model: what it is, how it was made, how good."""
    record = shipped.record
    lines = [f"{shipped.name}: {shipped.summary}"]
    lines += [f"  {line}" for line in record.get("made", [])]
    for key, how in record.get("figures", {}).items():
        if not key.endswith("_how"):
            lines.append(
                f"  {_label(key)}: pixel error {how['pixel_error']:.4f}{_challenge(how)}, Rand "
                f"error {how['rand_error']:.4f} ({record['figures'][key + '_how']})"
            )
    lines += [f"  measured as: {command}" for command in shipped.commands()]
    lines.append(f"  file: {shipped.path} (sha256 {shipped.sha256[:12]})")
    return lines


def _challenge(figures: dict[str, float]) -> str:
    """The pixel error as the ISBI challenge (and the paper) defined it, where it is recorded."""
    if "challenge_pixel_error" not in figures:
        return ""
    return f" (the ISBI challenge's 1 - F of the interior: {figures['challenge_pixel_error']:.4f})"


def _label(key: str) -> str:
    """A scoring's name as ``models`` prints it: ``held_out_argmax`` -> ``held out, argmax``."""
    who, argmax, _ = key.partition("_argmax")
    name = "this model" if who == "slices_20_24" else who.replace("_", " ")
    return f"{name}, argmax" if argmax else name


def model_names() -> str:
    """The shipped names, for error messages and help: ``'isbi2012-membranes'``."""
    return ", ".join(shipped_models()) or "none"
