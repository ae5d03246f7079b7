"""The U-Net's layers and forward pass, and an ensemble's, in one file that needs only torch.

This file is the architecture a bioimage.io package carries beside its ``pytorch_state_dict``
weights: a consumer (bioimageio.core, ilastik, BiaPy) imports it alone, with no unet-volume
installed, and loads the weights into :class:`UNet` or :func:`ensemble`. So it imports nothing
of this project, checks nothing and computes no geometry: :class:`unet_volume.models.unet.UNet`
adds the checks, the traced sizes and the paper's init on top, with the same parameter names.
Every function here is TorchScript-able (the package's ``torchscript`` weights script it).

Per level: two unpadded 3x3 (3x3x3) convolutions with ReLU (batch norm before each ReLU with
``batch_norm=True``, as the 3D U-Net); 2x2 max-pooling down, channels doubling; 2x2
up-convolutions up, halving them, each followed by crop-and-concat with the centre of the same
level's contracting features; a 1x1 convolution to ``num_classes`` logits. See
:mod:`unet_volume.models.unet` for the sizes of the paper's net.

>>> net = UNet(base_channels=4, depth=2).eval()
>>> tuple(net(torch.zeros(1, 1, 44, 44)).shape)
(1, 2, 4, 4)
"""

from typing import Final

import torch
from torch import nn

# A 3D U-Net is the 2D one with every layer one rank up.
_CONV: dict[int, type[nn.Conv2d | nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}
_UPCONV: dict[int, type[nn.ConvTranspose2d | nn.ConvTranspose3d]]
_UPCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL: dict[int, type[nn.MaxPool2d | nn.MaxPool3d]] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM: dict[int, type[nn.BatchNorm2d | nn.BatchNorm3d]] = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

TINY = 1e-12
"""The floor of an ensemble's mean probability before its log: log(0) would be -inf."""


def double_conv(in_ch: int, out_ch: int, ndim: int, batch_norm: bool) -> list[nn.Module]:
    """Two unpadded 3x3 convs, each followed by (batch norm and) ReLU."""
    layers: list[nn.Module] = []
    for c in (in_ch, out_ch):
        # With batch norm a conv bias would be cancelled by the mean subtraction: leave it out.
        layers.append(_CONV[ndim](c, out_ch, kernel_size=3, bias=not batch_norm))
        if batch_norm:
            layers.append(_NORM[ndim](out_ch))
        layers.append(nn.ReLU(inplace=True))
    return layers


def center_crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The centre of the spatial axes of ``x`` (n, c, *spatial), as large as ``like``'s."""
    for axis in range(2, x.dim()):
        start = (x.shape[axis] - like.shape[axis]) // 2
        x = x.narrow(axis, start, like.shape[axis])
    return x


class Up(nn.Module):
    """One expanding level: up-conv halving the channels, crop-and-concat, two 3x3 convs."""

    def __init__(self, in_ch: int, ndim: int, batch_norm: bool) -> None:
        super().__init__()
        self.up = _UPCONV[ndim](in_ch, in_ch // 2, kernel_size=2, stride=2)
        self.convs = nn.Sequential(*double_conv(in_ch, in_ch // 2, ndim, batch_norm))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (n, c, *s) -> (n, c/2, *2s)
        skip = center_crop(skip, x)  # (n, c/2, *2s), the contracting features
        x = torch.cat([skip, x], dim=1)  # (n, c, *2s)
        out: torch.Tensor = self.convs(x)  # (n, c/2, *(2s - 4))
        return out


class UNet(nn.Module):
    """The U-Net (2D) or 3D U-Net: ``(n, c, [z,] y, x)`` -> logits ``(n, k, [z,] y, x)``.

    Valid convolutions: the output is smaller than the input by a fixed margin, and each
    pooling must see an even size (:mod:`unet_volume.models.unet` says which inputs are valid).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        ndim: int = 2,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        channels = [base_channels * 2**level for level in range(depth + 1)]  # 64 ... 1024
        first = nn.Sequential(*double_conv(in_channels, base_channels, ndim, batch_norm))
        self.encoder = nn.ModuleList([first])
        for c in channels[1:]:
            pool = _POOL[ndim](kernel_size=2, stride=2)
            self.encoder.append(nn.Sequential(pool, *double_conv(c // 2, c, ndim, batch_norm)))
        self.dropout = nn.Dropout(dropout)  # the end of the contracting path
        self.decoder = nn.ModuleList([Up(c, ndim, batch_norm) for c in reversed(channels[1:])])
        self.head = _CONV[ndim](channels[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch; shapes below are the paper's 572 tile at depth 4."""
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)  # (n, 64, 568, 568), (n, 128, 280, 280), ..., (n, 1024, 28, 28)
            skips.append(x)
        x = self.dropout(skips.pop())  # (n, 1024, 28, 28), the bottom
        for up in self.decoder:
            x = up(x, skips.pop())  # (n, 512, 52, 52), ..., (n, 64, 388, 388)
        out: torch.Tensor = self.head(x)  # (n, num_classes, 388, 388)
        return out


class Ensemble(nn.Module):
    """The mean of ``members``' class probabilities, as logits (``log`` of the mean soft-max).

    The input comes normalised for the first member; member ``i`` sees
    ``x * scale[i] + shift[i]``, its own training's normalisation
    (:mod:`unet_volume.models.ensemble` derives the two).
    """

    def __init__(self, members: list[nn.Module], scale: list[float], shift: list[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32))

    scale: torch.Tensor  # buffers (one per member): the input moved to its normalisation
    shift: torch.Tensor
    tiny: Final[float] = TINY  # a TorchScript constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs: list[torch.Tensor] = []
        for i, net in enumerate(self.members):
            moved = x * self.scale[i].to(x.dtype) + self.shift[i].to(x.dtype)
            probs.append(net(moved).float().softmax(1))
        mean = torch.stack(probs).mean(dim=0)
        return torch.log(mean.clamp_min(self.tiny)).to(x.dtype)  # float32 until here: no log(0)


def ensemble(networks: int = 2, **unet: int | float | bool) -> Ensemble:
    """An ensemble of ``networks`` U-Nets built with ``unet``'s keywords (weights to load)."""
    members: list[nn.Module] = [UNet(**unet) for _ in range(networks)]  # type: ignore[arg-type]
    return Ensemble(members, [1.0] * networks, [0.0] * networks)
