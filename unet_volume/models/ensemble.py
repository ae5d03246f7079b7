"""Ensembles: several U-Nets of one geometry whose class probabilities are averaged.

Networks of one recipe trained with different seeds err in different places; the mean of their
probabilities errs less than either (measured on ISBI in benchmarks/RESULTS.md), as nnU-Net
ensembles its folds. An
ensemble costs one forward pass per member.

An :class:`Ensemble` is a network like :class:`~unet_volume.models.unet.UNet` to everything that
uses one: the same input and output shapes (so the same tiles, halo and exact stitching, each
member being exact), and its output serves as logits: ``log`` of the mean soft-max, whose
soft-max is that mean. Each member was trained with its own input normalisation; the ensemble
takes its first member's and moves the input to each other member's by an exact affine map
(``scale``, ``shift``), so one normalised input serves all. A checkpoint holds an ensemble as
one file (:func:`~unet_volume.models.checkpoint.save_ensemble`).

>>> import torch
>>> a, b = UNet(depth=1, base_channels=2).eval(), UNet(depth=1, base_channels=2).eval()
>>> x = torch.randn(1, 1, 18, 18)
>>> mean = (a(x).softmax(1) + b(x).softmax(1)) / 2
>>> torch.allclose(Ensemble([a, b]).eval()(x).softmax(1), mean, atol=1e-6)
True
"""

from __future__ import annotations

from collections.abc import Sequence

from unet_volume.errors import InputError
from unet_volume.models import architecture
from unet_volume.models.config import UNetConfig
from unet_volume.models.unet import UNet


class Ensemble(architecture.Ensemble):
    """The mean of ``members``' class probabilities, as logits (see the module's docstring).

    ``normalizations`` are the members' input (mean, std); the input comes normalised by the
    first's. All members must share one :class:`~unet_volume.models.config.UNetConfig`.
    """

    def __init__(
        self,
        members: Sequence[UNet],
        normalizations: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        if len(members) < 2:
            raise InputError(f"an ensemble takes 2 or more networks, got {len(members)}")
        configs = {m.config for m in members}
        if len(configs) > 1:
            raise InputError(
                f"an ensemble's networks must share one config, got {sorted(map(str, configs))}; "
                "pass networks of one recipe (e.g. other seeds)"
            )
        norms = list(normalizations or [(0.0, 1.0)] * len(members))
        if len(norms) != len(members):
            raise InputError(f"{len(norms)} normalizations for {len(members)} networks")
        (mean, std), means, stds = norms[0], *zip(*norms, strict=True)
        # Member i sees (raw - m_i) / s_i, with raw = x * std + mean: x * scale_i + shift_i.
        scale = [std / s for s in stds]
        shift = [(mean - m) / s for m, s in zip(means, stds, strict=True)]
        super().__init__(list(members), scale, shift)
        self.config: UNetConfig = members[0].config

    @classmethod
    def from_config(cls, config: UNetConfig, members: int) -> Ensemble:
        """``members`` fresh networks of ``config`` (weights to load, e.g. from a checkpoint)."""
        return cls([UNet.from_config(config) for _ in range(members)])

    def num_params(self) -> int:
        """Parameters of all members (the ``scale`` and ``shift`` buffers excluded)."""
        return sum(p.numel() for p in self.parameters())
