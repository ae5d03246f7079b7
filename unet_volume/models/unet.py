"""The U-Net of Ronneberger et al. (2015), in 2D or 3D, with valid (unpadded) convolutions.

Per level: two unpadded 3x3 (3x3x3) convolutions with ReLU (batch norm before each ReLU with
``batch_norm=True``, as in the 3D U-Net [2]); 2x2 max-pooling down, channels doubling; 2x2
up-convolutions up, halving them, each followed by crop-and-concat with the centre of the same
level's contracting features. The paper's net (depth 4, base 64), as ``size (channels)``::

    level  contracting: 2 convs                   expanding: up-conv, concat, 2 convs
    0      572 -> 570 -> 568 (64)  --crop 392-->  392 -> 390 -> 388 (64) -> 1x1 -> 388 (2)
             | pool                                ^ up-conv
    1      284 -> 282 -> 280 (128) --crop 200-->  200 -> 198 -> 196 (128)
             | pool                                ^
    2      140 -> 138 -> 136 (256) --crop 104-->  104 -> 102 -> 100 (256)
             | pool                                ^
    3       68 ->  66 ->  64 (512) --crop  56-->   56 ->  54 ->  52 (512)
             | pool                                ^
    4       32 ->  30 ->  28 (1024) -> dropout ----+

The layers and the forward pass are :mod:`unet_volume.models.architecture`'s (torch alone, the
file a bioimage.io package carries); this class adds the checks of the input, the He init of
the paper and the geometry, with the same parameters and state dict.

Unpadded convolutions make the output smaller than the input by a fixed ``halo`` per side
(92 for the paper's net) and make only some input sizes valid (every pooling must see an even
size). This module derives the sizes by tracing the layers themselves (:meth:`UNet.output_size`);
:mod:`unet_volume.tiling` computes the same numbers without torch, and a test checks they agree.
Both use tiling's one search for valid sizes and its one error naming the nearest.

>>> net = UNet(base_channels=8)
>>> net.halo, net.period, net.output_shape((572, 572))
((92, 92), (16, 16), (388, 388))
>>> net.output_shape((570, 572))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
unet_volume.errors.GeometryError: tile input 570 along y ...; nearest valid sizes are 556 and 572

References:
    [1] Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image
        Segmentation. MICCAI 2015. arXiv:1505.04597.
    [2] Cicek et al. 3D U-Net: Learning Dense Volumetric Segmentation from Sparse Annotation.
        MICCAI 2016. arXiv:1606.06650.
    [3] He et al. Delving Deep into Rectifiers. ICCV 2015. arXiv:1502.01852 (the init).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
from torch import nn

from unet_volume.errors import GeometryError, InputError
from unet_volume.models import architecture
from unet_volume.models.architecture import Up
from unet_volume.models.config import UNetConfig
from unet_volume.tiling import SizeMap, TileGeometry, check_input_size, next_valid_input

_CONV_TYPES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_POINTWISE = (nn.ReLU, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Identity)
_AXES = {2: "yx", 3: "zyx"}


# --- geometry: the size of each layer's output, from the layer's own attributes --------------


def _pick(value: object, axis: int) -> int:
    """A layer attribute (kernel_size, stride, ...) along one spatial axis."""
    if isinstance(value, int):
        return value
    if isinstance(value, tuple):
        return int(value[axis])
    raise TypeError(f"cannot trace a layer with geometry {value!r}; use int or tuple sizes")


def layer_output_size(layer: nn.Module, size: int, axis: int) -> int | None:
    """Output size of ``layer`` along spatial ``axis`` for an input of ``size``, or None.

    None where the layer cannot take the size: nothing would be left, or a pooling window would
    not tile the axis exactly (an odd size under 2x2 pooling; torch would silently drop the last
    row and shift every later pooling grid, so stitched tiles would no longer agree).
    """
    if isinstance(layer, _POINTWISE):
        return size
    if isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        k, s, p, d, extra = (
            _pick(getattr(layer, name), axis)
            for name in ("kernel_size", "stride", "padding", "dilation", "output_padding")
        )
        out = (size - 1) * s - 2 * p + d * (k - 1) + extra + 1
    elif isinstance(layer, (nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.MaxPool3d)):
        k, s, p, d = (
            _pick(getattr(layer, name), axis)
            for name in ("kernel_size", "stride", "padding", "dilation")
        )
        span = size + 2 * p - d * (k - 1) - 1
        if span < 0 or span % s:
            return None
        out = span // s + 1
    else:
        raise TypeError(f"cannot trace {type(layer).__name__}; teach layer_output_size its sizes")
    return out if out > 0 else None


def sequence_output_size(layers: Iterable[nn.Module], size: int | None, axis: int) -> int | None:
    """Output size of ``layers`` applied in order; None if one of them cannot take its input."""
    for layer in layers:
        if size is None:
            return None
        size = layer_output_size(layer, size, axis)
    return size


# --- the network --------------------------------------------------------------------------------


def _up_output_size(up: Up, size: int | None, skip_size: int, axis: int) -> int | None:
    """Output size of an expanding level along ``axis``; None if the skip is too small to crop
    or off-centre."""
    size = sequence_output_size([up.up], size, axis)
    if size is None or size > skip_size or (skip_size - size) % 2:
        return None
    return sequence_output_size(up.convs, size, axis)


def _init_he_normal(module: nn.Module) -> None:
    """Gaussian weights with std sqrt(2 / N), N = kernel volume x input channels [1, 3].

    One rule for every conv, up-conv and the 1x1 head, as the paper states it. torch's own
    kaiming fan_in would count output channels for a transposed conv, so N is computed here.
    """
    # A meta-device net (shapes only, e.g. checking a checkpoint) has no values to draw.
    if isinstance(module, _CONV_TYPES) and not module.weight.is_meta:
        fan_in = module.in_channels * math.prod(module.kernel_size)
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class UNet(architecture.UNet):
    """The U-Net [1] (2D) or 3D U-Net [2]: ``(n, c, [z,] y, x)`` -> logits ``(n, k, [z,] y, x)``.

    The forward pass returns logits (no soft-max) of a smaller spatial shape: see
    :meth:`output_shape`. Geometry is traced from the layers, never hard-coded.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        ndim: Literal[2, 3] = 2,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        config = UNetConfig(
            in_channels, num_classes, base_channels, depth, ndim, batch_norm, dropout
        )  # checked before any layer is built
        super().__init__(**config.to_dict())
        self.config = config
        self.apply(_init_he_normal)

    @classmethod
    def from_config(cls, config: UNetConfig) -> UNet:
        """The (freshly initialised) network that ``config`` describes."""
        return cls(**config.to_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch, after checking its rank, channels and sizes."""
        self._check_input(x)
        return super().forward(x)

    def _check_input(self, x: torch.Tensor) -> None:
        ndim, axes = self.config.ndim, ", ".join(_AXES[self.config.ndim])
        if x.dim() != ndim + 2:
            raise InputError(
                f"a {ndim}D U-Net takes a batch (n, c, {axes}), got shape {tuple(x.shape)}; "
                "add missing batch or channel axes, e.g. x[None, None]"
            )
        if x.shape[1] != self.config.in_channels:
            raise InputError(
                f"input has {x.shape[1]} channels but the U-Net was built for "
                f"{self.config.in_channels}; pass in_channels={x.shape[1]} or fix the input"
            )
        self.output_shape(x.shape[2:])

    def output_size(self, input_size: int, axis: int = 0) -> int | None:
        """Output size along spatial ``axis`` (0 = first of z/y/x) for ``input_size``, or None.

        Walks the layers in forward order, keeping the skip sizes, as :meth:`forward` does.

        >>> UNet(base_channels=8).output_size(188), UNet(base_channels=8).output_size(190)
        (4, None)
        """
        skips: list[int] = []
        size: int | None = input_size
        for block in self.encoder:
            size = sequence_output_size(cast(nn.Sequential, block), size, axis)
            if size is None:
                return None
            skips.append(size)
        size = sequence_output_size([self.dropout], skips.pop(), axis)  # the bottom
        for up in self.decoder:
            size = _up_output_size(cast(Up, up), size, skips.pop(), axis)
        return sequence_output_size([self.head], size, axis)

    @property
    def halo(self) -> tuple[int, ...]:
        """Context lost per side per spatial axis, e.g. (92, 92) for the paper's net."""
        smallest = [next_valid_input(self._size_map(axis), 1) for axis in range(self.config.ndim)]
        outputs = [cast(int, self.output_size(s, axis)) for axis, s in enumerate(smallest)]
        return tuple((s - o) // 2 for s, o in zip(smallest, outputs))

    @property
    def period(self) -> tuple[int, ...]:
        """The product of the pooling strides per axis (2**depth): the equivariance lattice."""
        pools = [m for m in self.modules() if isinstance(m, (nn.MaxPool2d, nn.MaxPool3d))]
        return tuple(
            math.prod(_pick(p.stride, axis) for p in pools) for axis in range(self.config.ndim)
        )

    def _spatial(self, shape: Sequence[int], name: str) -> tuple[int, ...]:
        values = tuple(int(s) for s in shape)
        ndim = self.config.ndim
        if len(values) != ndim:
            raise GeometryError(
                f"{name} {values} has {len(values)} axes; a {ndim}D U-Net takes {ndim} sizes "
                f"({', '.join(_AXES[ndim])})"
            )
        return values

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial ``input_shape``; GeometryError if it is invalid."""
        shape = self._spatial(input_shape, "input_shape")
        return tuple(self._checked_output_size(size, axis) for axis, size in enumerate(shape))

    def _checked_output_size(self, size: int, axis: int) -> int:
        return check_input_size(
            self._size_map(axis),
            size,
            depth=self.config.depth,
            axis=_AXES[self.config.ndim][axis],
        )

    def _size_map(self, axis: int) -> SizeMap:
        """:meth:`output_size` along one axis, as the size search of :mod:`tiling` takes it."""
        return functools.partial(self.output_size, axis=axis)

    def input_shape_for(self, output_shape: Sequence[int]) -> tuple[int, ...]:
        """The smallest valid spatial input whose output is at least ``output_shape`` per axis.

        >>> UNet(base_channels=8).input_shape_for((388, 389))
        (572, 588)
        """
        wanted = self._spatial(output_shape, "output_shape")
        if min(wanted) < 1:
            raise GeometryError(f"output_shape {wanted} must be positive; pass sizes >= 1")
        inputs = []
        for axis, (want, halo) in enumerate(zip(wanted, self.halo)):
            # A valid input loses exactly 2 * halo, so no smaller input can cover `want`.
            size = next_valid_input(self._size_map(axis), want + 2 * halo)
            while cast(int, self.output_size(size, axis)) < want:
                size = next_valid_input(self._size_map(axis), size + 1)
            inputs.append(size)
        return tuple(inputs)

    def tile_geometry(self, min_output: Sequence[int]) -> TileGeometry:
        """The smallest tile whose output covers ``min_output`` (z, y, x), in the volume frame.

        A 2D net convolves (y, x) only; its z extent is a batch of slices.
        """
        return TileGeometry.for_unet(
            ndim=self.config.ndim, depth=self.config.depth, min_output=min_output
        )

    def num_params(self) -> int:
        """Number of trainable and frozen parameters (buffers such as batch-norm stats excluded)."""
        return sum(p.numel() for p in self.parameters())


def channels_last(ndim: int) -> torch.memory_format:
    """The fast layout of a ``ndim``-D net's activations: channels last, as oneDNN and cuDNN
    compute convolutions (a contiguous tensor is reordered at every layer)."""
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def count_conv_layers(model: nn.Module) -> int:
    """Convolutions and up-convolutions in ``model``: 23 for the paper's net (18 + 4 + 1)."""
    return sum(isinstance(m, _CONV_TYPES) for m in model.modules())
