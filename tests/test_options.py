"""One source for every option: the CLI, the flows and the library agree on names and defaults.

Each default lives in a config dataclass (``TrainConfig`` and its ``UNetConfig``,
``PredictOptions``, ``WeightMapConfig``); ``unet-volume`` and the Prefect flows read theirs from
there. These tests fail if a second copy of a default appears and drifts (issue 12, part 3).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import replace
from typing import Any

import pytest

from unet_volume.cli.main import build_parser
from unet_volume.cli.train import train_config_from, weight_map_config_from
from unet_volume.models.config import UNetConfig
from unet_volume.option_fields import options_from
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.run import predict_volume
from unet_volume.training.config import TrainConfig
from unet_volume.training.weight_map import WeightMapConfig
from unet_volume_flows.demo import demo_flow
from unet_volume_flows.predict import predict_flow
from unet_volume_flows.train import train_flow

TRAIN = ["train", "image.zarr", "labels.zarr", "--out", "model.pt"]
PREDICT = ["predict", "in.zarr", "out.zarr", "--model", "model.pt"]


def flow_defaults(flow: Any) -> dict[str, Any]:
    """The flow's keyword parameters and their defaults, as Prefect shows them."""
    parameters = inspect.signature(flow.fn).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def test_options_cli_defaults_are_the_configs_defaults() -> None:
    parser = build_parser()
    assert train_config_from(parser.parse_args(TRAIN)) == TrainConfig()
    assert options_from(parser.parse_args(PREDICT), PredictOptions) == PredictOptions()
    weights = parser.parse_args(["weights", "labels.zarr", "w.zarr"])
    assert weight_map_config_from(weights) == WeightMapConfig()


@pytest.mark.parametrize(
    "flags, steps, minutes",
    [
        pytest.param([], None, 3.0, id="neither: the default budget"),
        pytest.param(["--steps", "5000"], 5000, None, id="steps alone: no time limit"),
        pytest.param(["--minutes", "30"], None, 30.0, id="minutes alone"),
        pytest.param(["--steps", "50", "--minutes", "1"], 50, 1.0, id="both: the first reached"),
    ],
)
def test_options_train_stops_at_steps_alone_when_only_steps_are_given(
    flags: list[str], steps: int | None, minutes: float | None
) -> None:
    # A 5000-step retrain of the shipped model stopped at 257 steps: the default 3 minutes
    # applied to --steps too.
    config = train_config_from(build_parser().parse_args([*TRAIN, *flags]))
    assert (config.steps, config.time_budget) == (steps, minutes)


def test_options_flows_and_library_take_the_records_and_their_defaults() -> None:
    # No field restated: each flow's parameter is the record, its default the record's own.
    for flow, name, record in (
        (predict_flow, "options", PredictOptions),
        (train_flow, "config", TrainConfig),
    ):
        defaults = flow_defaults(flow)
        assert defaults[name] == record()
        assert not {f.name for f in dataclasses.fields(record)} & set(defaults)
    assert inspect.signature(predict_volume).parameters["options"].default == PredictOptions()
    assert flow_defaults(demo_flow)["minutes"] == TrainConfig().time_budget


def test_options_a_network_given_in_part_changes_the_trained_default_not_the_papers() -> None:
    # A deployment's {"model": {"depth": 2}} keeps the 16 base channels `unet-volume train` has.
    required = {"image": "i.zarr", "labels": "l.zarr", "model": "m.pt"}
    given = {**required, "config": {"steps": 5, "model": {"depth": 2}}}
    config = train_flow.validate_parameters(given)["config"]
    assert config == TrainConfig(steps=5, model=replace(TrainConfig().model, depth=2))
    assert config.model.base_channels == 16 != UNetConfig().base_channels


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32", "float64"])
def test_options_predict_flow_takes_every_output_dtype(dtype: str) -> None:
    # issue 12: the flow's dtype Literal was a copy that had lost float64.
    required = {"image": "in.zarr", "model": "m.pt", "out": "out.zarr"}
    validated = predict_flow.validate_parameters({**required, "options": {"output_dtype": dtype}})
    assert validated["options"] == PredictOptions(output_dtype=dtype)


@pytest.mark.parametrize(
    ("config", "skip"),
    [
        pytest.param(TrainConfig(), {"model"}, id="train"),
        pytest.param(UNetConfig(), {"in_channels"}, id="network"),  # in_channels: the image's
        pytest.param(PredictOptions(), set(), id="predict"),
    ],
)
def test_options_every_field_is_a_cli_option(config: Any, skip: set[str]) -> None:
    command = "predict" if isinstance(config, PredictOptions) else "train"
    args = build_parser().parse_args(PREDICT if command == "predict" else TRAIN)
    fields = {f.name for f in dataclasses.fields(config)} - skip
    assert fields <= set(vars(args)), fields - set(vars(args))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(["--batch-norm"], {"batch_norm": True}, id="batch-norm"),
        pytest.param(["--dropout", "0"], {"dropout": 0.0}, id="dropout"),
        pytest.param(["--classes", "3"], {"num_classes": 3}, id="classes-old-name"),
        pytest.param(["--num-classes", "3"], {"num_classes": 3}, id="num-classes"),
        pytest.param(["--lr", "0.5"], {"learning_rate": 0.5}, id="lr-old-name"),
        pytest.param(["--learning-rate", "0.5"], {"learning_rate": 0.5}, id="learning-rate"),
        pytest.param(["--no-class-balance"], {"class_balance": False}, id="no-class-balance"),
        pytest.param(["--no-amp"], {"amp": False}, id="no-amp"),
        pytest.param(["--z-range", "0:20"], {"z_range": (0, 20)}, id="z-range"),
        pytest.param(["--tile-output", "1,20,20"], {"tile_output": (1, 20, 20)}, id="tile"),
    ],
)
def test_options_train_flags_reach_the_config(flags: list[str], expected: dict[str, Any]) -> None:
    config = train_config_from(build_parser().parse_args([*TRAIN, "--depth", "2", *flags]))
    values = {**dataclasses.asdict(config), **dataclasses.asdict(config.model)}
    assert {name: values[name] for name in expected} == expected


def test_options_predict_volume_takes_options_or_their_fields() -> None:
    # The same fields, by name, in one place: `predict_volume(..., block_shape=...)` replaces
    # that field of `options`; a name that is not a field fails like any bad keyword.
    with pytest.raises(TypeError, match="block_shap"):
        predict_volume("m.pt", "in.zarr", "out.zarr", block_shap=(1, 16, 16))
