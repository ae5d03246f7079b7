"""A package's weights: one network three ways, each checked to give torch's logits.

``pytorch_state_dict`` with its architecture's source (:mod:`unet_volume.models.architecture`,
which needs torch alone) is the reference; ``torchscript`` is what QuPath and deepImageJ read;
``onnx`` is kept where torch's exporter converts it cleanly and ONNX Runtime gives the same
logits on the test input and on a larger one, and left out, saying why, where not.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bioimageio.spec.model.v0_5 import (
    ArchitectureFromFileDescr,
    Identifier,
    OnnxWeightsDescr,
    PytorchStateDictWeightsDescr,
    TorchscriptWeightsDescr,
    Version,
    WeightsDescr,
)
from torch import nn

from unet_volume.models import architecture
from unet_volume.models.checkpoint import Checkpoint

FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4
"""Largest difference to torch's logits at which the ONNX weights are kept."""


@contextlib.contextmanager
def their_warnings_quiet() -> Iterator[None]:
    """torch 2.13 deprecates TorchScript and its exporters warn of their own internals: not
    the user's to act on, and fatal where warnings are errors (as in this project's tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _callable(checkpoint: Checkpoint) -> str:
    """The architecture's function or class that builds this checkpoint's network."""
    return "UNet" if checkpoint.members == 1 else "ensemble"


def _kwargs(checkpoint: Checkpoint) -> dict[str, Any]:
    kwargs: dict[str, Any] = checkpoint.config.to_dict()
    return kwargs if checkpoint.members == 1 else {"networks": checkpoint.members, **kwargs}


def plain_network(checkpoint: Checkpoint, network: nn.Module) -> nn.Module:
    """``network`` as the package's architecture builds it (no checks), with its weights."""
    plain: nn.Module = getattr(architecture, _callable(checkpoint))(**_kwargs(checkpoint))
    plain.load_state_dict(network.state_dict())
    return plain.eval()


def write_weights(
    work: Path,
    plain: nn.Module,
    checkpoint: Checkpoint,
    x: torch.Tensor,
    period: Sequence[int],
    onnx: bool,
) -> tuple[WeightsDescr, dict[str, str]]:
    """The weights formats written into ``work``, and those left out with why. ``x`` is the
    normalised test input; ``period`` the net's valid-size step (the ONNX check's larger
    input)."""
    version = Version(torch.__version__.split("+")[0])
    source = work / "architecture.py"
    source.write_bytes(Path(inspect.getfile(architecture)).read_bytes())
    torch.save(plain.state_dict(), work / "weights.pt")
    state_dict = PytorchStateDictWeightsDescr(
        source=work / "weights.pt",
        architecture=ArchitectureFromFileDescr(
            source=source, callable=Identifier(_callable(checkpoint)), kwargs=_kwargs(checkpoint)
        ),
        pytorch_version=version,
    )
    with their_warnings_quiet():  # QuPath and deepImageJ read TorchScript alone
        torch.jit.script(plain).save(str(work / "weights.torchscript.pt"))
    script = TorchscriptWeightsDescr(
        source=work / "weights.torchscript.pt", pytorch_version=version, parent="pytorch_state_dict"
    )
    why = (
        _write_onnx(work / "weights.onnx", plain, x, period)
        if onnx
        else "not asked for (--no-onnx)"
    )
    onnx_descr = None
    if why is None:
        onnx_descr = OnnxWeightsDescr(
            source=work / "weights.onnx", opset_version=ONNX_OPSET, parent="pytorch_state_dict"
        )
    weights = WeightsDescr(pytorch_state_dict=state_dict, torchscript=script, onnx=onnx_descr)
    return weights, ({} if why is None else {"onnx": why})


def _write_onnx(path: Path, plain: nn.Module, x: torch.Tensor, period: Sequence[int]) -> str | None:
    """Export to ONNX with free batch and spatial sizes and check it on ``x`` and on a larger
    input; None when it holds, else why it was left out."""
    free = torch.export.Dim.AUTO
    dims = {axis: free for axis in (0, *range(2, x.dim()))}
    try:
        import onnxruntime

        with their_warnings_quiet():
            torch.onnx.export(
                plain, (x,), str(path), dynamo=True, input_names=["raw"],
                output_names=["logits"], dynamic_shapes=(dims,), opset_version=ONNX_OPSET,
                verbose=False, external_data=False,
            )  # fmt: skip
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        larger = torch.nn.functional.pad(x, (0, period[-1]))  # the next valid size along x
        for sample in (x, torch.cat([larger, larger])):
            (got,) = session.run(None, {"raw": sample.numpy()})
            with torch.inference_mode():
                want = plain(sample).numpy()
            if got.shape != want.shape or float(np.abs(got - want).max()) > ONNX_TOLERANCE:
                return (
                    f"ONNX Runtime's output differs from torch's on a {tuple(sample.shape)} input"
                )
    except Exception as error:
        path.unlink(missing_ok=True)
        return f"the ONNX export failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    return None
