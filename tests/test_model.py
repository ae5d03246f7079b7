"""Specification of the U-Net: the paper's numbers, geometry traced from the layers, init.

Geometry facts used below (two unpadded 3x3 convs per level, depth d):
halo = 6 * 2**d - 4 per side (92 at d = 4, 44 at d = 3, 20 at d = 2), period = 2**d,
and valid inputs are 2 * halo + 4 + k * 2**d (188, 204, ... at d = 4).
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from unet_volume.errors import GeometryError, InputError
from unet_volume.models import architecture
from unet_volume.models.unet import UNet, UNetConfig, count_conv_layers
from unet_volume.tiling import UNetShape

PROPERTY = settings(max_examples=50, deadline=None)
depths = st.integers(min_value=1, max_value=4)
ndims = st.sampled_from([2, 3])


@functools.cache
def tiny_unet(depth: int, ndim: int) -> UNet:
    """A net with the geometry of a full one and almost no weights (shapes only)."""
    torch.manual_seed(0)
    return UNet(depth=depth, ndim=ndim, base_channels=4).eval()


def paper_unet(**overrides: Any) -> UNet:
    """The paper's net on the meta device: real layers, no memory, no init cost."""
    with torch.device("meta"):
        return UNet(**overrides)


# --- the paper's numbers -------------------------------------------------------------------


def test_unet_paper_config_has_23_convs_and_31030658_params() -> None:
    net = paper_unet()  # 1 input channel, 2 classes, base 64, depth 4
    # 18 3x3 convs (2 per level x 9 levels) + 4 up-convs + 1 1x1 head = 23, as in the paper.
    assert count_conv_layers(net) == 23
    assert net.num_params() == 31_030_658


def test_unet_base16_has_1940834_params() -> None:
    assert paper_unet(base_channels=16).num_params() == 1_940_834


def test_unet_paper_config_maps_572_to_388_with_margin_92_and_period_16() -> None:
    net = paper_unet()
    assert net.halo == (92, 92)  # 6 * 16 - 4
    assert net.period == (16, 16)  # 2**4
    assert net.output_shape((572, 572)) == (388, 388)  # 572 - 2 * 92
    assert net.output_shape((188, 188)) == (4, 4)  # the smallest tile: bottom size 4 -> 16 * 4 - 60
    assert net.input_shape_for((388, 388)) == (572, 572)


def test_unet_forward_at_base_8_gives_the_paper_geometry() -> None:
    torch.manual_seed(0)
    net = UNet(base_channels=8).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 204, 220))  # valid: 188 + 16 and 188 + 32
    assert y.shape == (1, 2, 20, 36)  # 204 - 184, 220 - 184; logits for 2 classes


def test_unet_3d_depth_3_loses_44_per_side_as_in_cicek_et_al() -> None:
    net = tiny_unet(depth=3, ndim=3)
    assert net.halo == (44, 44, 44)  # 6 * 8 - 4
    assert net.period == (8, 8, 8)
    # Cicek et al.: input 132 x 132 x 116 gives output 44 x 44 x 28 (z first here).
    assert net.output_shape((116, 132, 132)) == (28, 44, 44)
    with torch.no_grad():
        y = net(torch.randn(1, 1, 92, 100, 92))  # the smallest valid tile is 92 = 88 + 4
    assert y.shape == (1, 2, *net.output_shape((92, 100, 92))) == (1, 2, 4, 12, 4)


# --- geometry: the layer trace, tiling's arithmetic and real forward passes agree ----------


@PROPERTY
@given(depth=depths, ndim=ndims, size=st.integers(min_value=-2, max_value=600))
def test_unet_layer_trace_agrees_with_unet_shape(depth: int, ndim: int, size: int) -> None:
    net = tiny_unet(depth, ndim)
    for axis in range(ndim):
        assert net.output_size(size, axis) == UNetShape(depth).output_size(size)


@PROPERTY
@given(
    depth=depths,
    ndim=ndims,
    min_output=st.tuples(*(st.integers(min_value=1, max_value=120),) * 3),
)
def test_unet_tile_geometry_agrees_with_layer_trace(
    depth: int, ndim: int, min_output: tuple[int, ...]
) -> None:
    net = tiny_unet(depth, ndim)
    geometry = net.tile_geometry(min_output)  # (z, y, x); a 2D net convolves (y, x) only
    conv = slice(3 - ndim, 3)
    assert net.output_shape(geometry.input_shape[conv]) == geometry.output_shape[conv]
    assert geometry.halo[conv] == net.halo
    assert geometry.period[conv] == net.period
    # A tile's output spans at least one period, so that tiles can step along the lattice.
    wanted = [max(w, p) for w, p in zip(min_output[conv], net.period)]
    assert net.input_shape_for(wanted) == geometry.input_shape[conv]


def _named_sizes(message: str) -> list[int]:
    return [int(s) for s in re.findall(r"\d+", message.split("nearest valid")[1])]


@PROPERTY
@given(depth=depths, size=st.integers(min_value=1, max_value=600))
def test_unet_invalid_size_raises_geometry_error_naming_the_valid_neighbours(
    depth: int, size: int
) -> None:
    net = tiny_unet(depth, ndim=2)
    assume(net.output_size(size) is None)
    valid_x = net.input_shape_for((1, 1))[1]
    with pytest.raises(GeometryError, match=f"tile input {size} along y") as info:
        net.output_shape((size, valid_x))
    # Brute force: the largest valid size below (if any) and the smallest above.
    reach = size + 2 * net.halo[0] + 2 * net.period[0]
    valid = [s for s in range(1, reach) if net.output_size(s) is not None]
    below, above = [s for s in valid if s < size], [s for s in valid if s > size]
    expected = ([max(below)] if below else []) + [min(above)]
    assert _named_sizes(str(info.value)) == expected
    with pytest.raises(GeometryError) as tiling_info:  # tiling's torch-free arithmetic agrees
        UNetShape(depth).check_input_size(size)
    assert _named_sizes(str(tiling_info.value)) == expected


def test_unet_output_shape_names_556_and_572_for_570() -> None:
    with pytest.raises(GeometryError, match=r"570 along x .* nearest valid sizes are 556 and 572"):
        paper_unet().output_shape((572, 570))


def test_unet_output_shape_names_188_for_too_small_a_tile() -> None:
    with pytest.raises(GeometryError, match=r"nearest valid size is 188$"):
        paper_unet().output_shape((100, 572))


def test_unet_output_shape_rejects_the_wrong_number_of_axes() -> None:
    with pytest.raises(GeometryError, match=r"a 2D U-Net takes 2 sizes \(y, x\)"):
        paper_unet().output_shape((1, 572, 572))


@PROPERTY
@given(depth=depths, ndim=ndims, wanted=st.integers(min_value=1, max_value=300))
def test_unet_input_shape_for_is_the_smallest_input_covering_the_output(
    depth: int, ndim: int, wanted: int
) -> None:
    net = tiny_unet(depth, ndim)
    size = net.input_shape_for((wanted,) * ndim)[0]
    out = net.output_size(size)
    assert out is not None and out >= wanted
    assert all((net.output_size(s) or 0) < wanted for s in range(1, size))


@settings(max_examples=12, deadline=None)
@given(
    depth=st.integers(min_value=1, max_value=3),
    ndim=ndims,
    steps=st.tuples(*(st.integers(min_value=0, max_value=1),) * 3),
)
def test_unet_forward_gives_the_traced_output_shape(
    depth: int, ndim: int, steps: tuple[int, int, int]
) -> None:
    assume(ndim == 2 or depth <= 2)  # 3D depth 3 has its own test; keep this one fast
    net = tiny_unet(depth, ndim)
    smallest = net.input_shape_for((1,) * ndim)
    shape = tuple(s + k * p for s, k, p in zip(smallest, steps, net.period))  # valid sizes
    with torch.no_grad():
        y = net(torch.randn(1, 1, *shape))
    assert y.shape == (1, 2, *net.output_shape(shape))


def test_unet_forward_rejects_an_invalid_tile_before_running() -> None:
    with pytest.raises(GeometryError, match="tile input 190 along y"):
        tiny_unet(4, 2)(torch.zeros(1, 1, 190, 188))


@pytest.mark.parametrize(
    "shape, message",
    [
        pytest.param((188, 188), r"takes a batch \(n, c, y, x\)", id="no-batch-axes"),
        pytest.param((1, 3, 188, 188), "3 channels but the U-Net was built for 1", id="channels"),
    ],
)
def test_unet_forward_rejects_batches_of_the_wrong_layout(
    shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        tiny_unet(4, 2)(torch.zeros(shape))


# --- layers and initialisation -------------------------------------------------------------


def test_unet_init_is_he_normal_with_std_sqrt_2_over_n_and_zero_biases() -> None:
    torch.manual_seed(0)
    net = UNet(base_channels=16)
    checked = set()
    for name, layer in net.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        assert layer.bias is not None and not layer.bias.any(), name
        if layer.weight.numel() < 100_000:  # too few samples for a tight estimate
            continue
        # N = kernel volume x input channels, also for up-convs. torch's default init would give
        # std sqrt(1 / (3 N)), 0.41 of this; kaiming_normal_ on an up-conv, 1.41 times it.
        expected = math.sqrt(2 / (layer.in_channels * math.prod(layer.kernel_size)))
        weight = layer.weight.detach()
        assert weight.std().item() == pytest.approx(expected, rel=0.02), name
        assert abs(weight.mean().item()) < 0.02 * expected, name
        checked.add(type(layer))
    assert checked == {nn.Conv2d, nn.ConvTranspose2d}


def test_unet_batch_norm_precedes_every_relu_and_keeps_the_geometry() -> None:
    net = UNet(depth=2, base_channels=4, batch_norm=True)
    layers = list(net.modules())
    relus = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    assert len(relus) == 2 * (2 * 2 + 1)  # two per level, 5 levels at depth 2
    assert all(isinstance(layers[i - 1], nn.BatchNorm2d) for i in relus)
    assert net.halo == tiny_unet(2, 2).halo == (20, 20)


def test_unet_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=8, dropout=0.5)
    x = torch.randn(1, 1, 60, 60)
    with torch.no_grad():
        assert not torch.equal(net.train()(x), net(x))  # a fresh mask each pass
        assert torch.equal(net.eval()(x), net(x))


# --- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("in_channels", 0, id="no-input-channels"),
        pytest.param("num_classes", 1, id="one-class"),
        pytest.param("base_channels", 2.5, id="fractional-channels"),
        pytest.param("depth", 0, id="no-pooling"),
        pytest.param("depth", True, id="bool-depth"),
        pytest.param("ndim", 4, id="4d"),
        pytest.param("batch_norm", "yes", id="batch-norm-string"),
        pytest.param("dropout", 1.0, id="dropout-everything"),
    ],
)
def test_unet_config_rejects_bad_values_naming_the_value(field: str, value: object) -> None:
    with pytest.raises(InputError, match=re.escape(repr(value))) as info:
        UNetConfig(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)


def test_unet_config_round_trips_through_json() -> None:
    config = UNetConfig(3, 4, base_channels=4, depth=3, ndim=3, batch_norm=True, dropout=0)
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert UNet.from_config(config).config == config


def test_unet_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(InputError, match="unknown U-Net config keys \\['padding'\\]"):
        UNetConfig.from_dict({"depth": 3, "padding": 1})


@pytest.mark.parametrize("ndim", [2, 3])
def test_model_architecture_alone_and_scripted_give_the_unets_logits(ndim: int) -> None:
    # What a bioimage.io package runs: the layers without the checks, eager and TorchScript.
    torch.manual_seed(0)
    net = UNet(base_channels=4, depth=2, ndim=ndim).eval()
    plain = architecture.UNet(base_channels=4, depth=2, ndim=ndim).eval()
    plain.load_state_dict(net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        scripted = torch.jit.script(plain)
    for size in (44, 52):
        x = torch.randn(2, 1, *[size] * ndim)
        with torch.inference_mode():
            want = net(x)
            assert torch.equal(plain(x), want)  # the same modules, called in the same order
            torch.testing.assert_close(scripted(x), want, rtol=0, atol=1e-6)
