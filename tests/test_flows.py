"""The Prefect flows: real flow runs on Prefect's local test API and the shared LocalCluster."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import fsspec
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
import zarr
from distributed import Client
from fsspec.implementations.local import LocalFileSystem
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ParameterTypeError
from prefect.flows import load_flow_from_entrypoint
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.schema_tools import validate
from test_bad_input import nan_image, setup_files  # the same files as the CLI's cases

from unet_volume import __version__
from unet_volume.cluster.spec import local_cluster_config
from unet_volume.errors import (
    BlockError,
    CheckpointError,
    InputError,
    OutputExistsError,
    UnetVolumeError,
)
from unet_volume.models.checkpoint import read_checkpoint, save_model
from unet_volume.models.config import UNetConfig
from unet_volume.models.unet import UNet
from unet_volume.output.lifecycle import read_status, run_info
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.plan import plan_prediction
from unet_volume.prediction.run import predict_volume
from unet_volume.testing import blob_volume, free_port_cluster, snapshot
from unet_volume.training.config import TrainConfig
from unet_volume_flows.artifacts import default_preview
from unet_volume_flows.ingest import ingest_flow
from unet_volume_flows.predict import predict_flow
from unet_volume_flows.train import train_flow


@pytest.fixture(scope="module", autouse=True)
def prefect_api() -> Iterator[None]:
    """Prefect's test API on a throw-away SQLite database; 120 s for a cold start on 2 cores."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_model(path: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    save_model(UNet(in_channels=1, base_channels=8, depth=2, ndim=2, dropout=0.0), path)
    return str(path)


def write_zarr(path: Path, data: np.ndarray) -> str:
    array = zarr.create_array(path, shape=data.shape, dtype=data.dtype, chunks=(1, 16, 16))
    array[:] = data
    return str(path)


def field_help(config: type, name: str) -> str:
    [field] = [f for f in dataclasses.fields(config) if f.name == name]
    return str(field.metadata["help"])


def artifacts(key: str) -> list[Any]:
    """Every version of the Prefect artifact ``key``, newest first, read back from the API."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as api:
        return api.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort="CREATED_DESC",
        )


def artifact(key: str) -> Any:
    """The newest Prefect artifact with ``key``."""
    found = artifacts(key)
    assert found, f"no artifact {key}"
    return found[0]


def metrics(key: str) -> dict[str, Any]:
    """The newest table artifact with ``key`` (metric/value rows) as a dict."""
    return {row["metric"]: row["value"] for row in json.loads(artifact(key).data)}


def embedded_images(markdown: str) -> list[str]:
    """The data URLs of the images a markdown artifact embeds."""
    return re.findall(r"!\[[^\]]*\]\((data:image/[^)]+)\)", markdown)


def test_predict_flow_output_equals_predict_volume(client: Client, tmp_path: Path) -> None:
    image = write_zarr(tmp_path / "in.zarr", blob_volume((3, 40, 36)))
    model = tiny_model(tmp_path / "m.pt")
    report = predict_flow(
        image,
        model,
        str(tmp_path / "flow.zarr"),
        PredictOptions(block_shape=(1, 16, 16)),
        scheduler=client.scheduler.address,
    )
    predict_volume(model, image, tmp_path / "library.zarr", block_shape=(1, 16, 16), client=client)
    for name in ("probabilities", "segmentation"):
        np.testing.assert_array_equal(
            zarr.open_array(tmp_path / "flow.zarr" / name)[:],
            zarr.open_array(tmp_path / "library.zarr" / name)[:],
        )
    assert report["blocks"] == 3 * 3 * 3 and report["voxels"] == 3 * 40 * 36


def test_predict_flow_plans_an_automatic_block_for_the_workers_that_run_it(
    tmp_path: Path,
) -> None:
    # A GPU worker with a memory limit gets the block `unet-volume plan` picks for it, not the
    # one for CPU workers without a limit that the flow could see before its cluster existed.
    image = write_zarr(tmp_path / "in.zarr", blob_volume((2, 256, 256)))
    model = tiny_model(tmp_path / "m.pt")
    auto = PredictOptions(block_shape="auto")
    gpu = {"n_workers": 1, "threads_per_worker": 1, "memory_limit": "2GiB", "resources": {"GPU": 1}}
    with (
        dask.config.set(local_cluster_config()),
        free_port_cluster(**gpu) as cluster,
        Client(cluster) as own,
    ):
        workers = own.scheduler_info(n_workers=-1)["workers"]
        for_them = plan_prediction(model, image, tmp_path / "o.zarr", auto, workers=workers)
        before = plan_prediction(model, image, tmp_path / "o.zarr", auto)
        predict_flow(
            image,
            model,
            str(tmp_path / "out.zarr"),
            {"block_shape": "auto"},
            scheduler=own.scheduler.address,
        )
    identity = run_info(str(tmp_path / "out.zarr"))["identity"]  # type: ignore[index]
    assert identity["block_shape"] == list(for_them.block_shape) == [2, 256, 256]
    assert before.block_shape != for_them.block_shape


def test_predict_flow_instances_stage_labels_the_objects_and_publishes_the_largest(
    client: Client, tmp_path: Path
) -> None:
    image = write_zarr(tmp_path / "in.zarr", blob_volume((3, 40, 36)))
    out = str(tmp_path / "flow.zarr")
    report = predict_flow(
        image,
        tiny_model(tmp_path / "m.pt"),
        out,
        instances="watershed",
        scheduler=client.scheduler.address,
    )
    objects = report["instances"]
    assert objects["output_url"] == f"{out}/labels/watershed"
    table = pd.read_parquet(f"{out}.watershed.objects.parquet")
    assert objects["objects"] == len(table) > 0
    rows = json.loads(artifact("objects").data)
    assert len(rows) == min(20, len(table))
    assert rows[0]["voxels"] == table["voxels"].max()


def test_predict_flow_passes_shards_and_precision_to_the_library(
    client: Client, tmp_path: Path
) -> None:
    image = write_zarr(tmp_path / "in.zarr", blob_volume((3, 40, 36)))
    model = tiny_model(tmp_path / "m.pt")
    options = {"block_shape": (1, 16, 16), "shard_shape": (3, 32, 32), "precision": "bfloat16"}
    flow_options = {**options, "precision": "bfloat16"}  # as the run form sends them: JSON
    predict_flow(
        image, model, str(tmp_path / "flow.zarr"), flow_options, scheduler=client.scheduler.address
    )
    predict_volume(model, image, tmp_path / "library.zarr", **options, client=client)
    for name in ("probabilities", "segmentation"):
        np.testing.assert_array_equal(
            zarr.open_array(tmp_path / "flow.zarr" / name)[:],
            zarr.open_array(tmp_path / "library.zarr" / name)[:],
        )
    identity = run_info(str(tmp_path / "flow.zarr"))["identity"]  # type: ignore[index]
    assert (identity["shard_shape"], identity["precision"]) == ([3, 32, 32], "bfloat16")


def test_predict_flow_records_provenance_and_publishes_a_table_and_a_preview(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    image = write_zarr(Path("in.zarr"), blob_volume((2, 32, 32)))
    report = predict_flow(
        image, tiny_model(Path("m.pt")), "out.zarr", scheduler=client.scheduler.address
    )
    provenance = run_info("out.zarr")["provenance"]  # type: ignore[index]
    assert provenance["parameters"]["image"] == image
    assert provenance["flow_run"] and provenance["environment"]["packages"]["torch"]
    assert Path(report["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = metrics("prediction-run")
    assert figures["voxels"] == 2 * 32 * 32 and figures["output"] == str(tmp_path / "out.zarr")
    assert figures["input"] == str(tmp_path / "in.zarr")  # absolute, as a reader elsewhere needs
    # The preview is inline (a browser refuses file:// links), within its budget.
    preview = artifact("prediction-preview")
    [image] = embedded_images(preview.data)
    assert image.startswith("data:image/jpeg;base64,") and len(image) <= 200_100
    assert f"`{tmp_path / 'out.preview.png'}`" in preview.data and preview.description


def run_logs(flow_run_id: Any, last: str) -> list[str]:
    """The messages a flow run and its tasks logged, oldest first, read back from the API once
    one starting with ``last`` is there (logs reach the API in batches, in the background)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what is queued, waiting up to 5 s
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as api:
            logs = api.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                sort=LogSort.TIMESTAMP_ASC,
            )
        messages = [log.message for log in logs]
        if any(m.startswith(last) for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def test_predict_flow_logs_what_runs_where_how_far_and_the_outcome(
    client: Client, tmp_path: Path
) -> None:
    image = write_zarr(tmp_path / "in.zarr", blob_volume((4, 32, 32)))
    model = tiny_model(tmp_path / "m.pt")
    out = tmp_path / "out.zarr"
    state = predict_flow(
        image,
        model,
        str(out),
        PredictOptions(block_shape=(1, 16, 16), shard_shape=(1, 16, 16)),
        scheduler=client.scheduler.address,
        return_state=True,
    )
    assert state.is_completed()
    lines = run_logs(state.state_details.flow_run_id, last=f"predicted {out}")
    sha = read_checkpoint(model).sha256[:12]
    [start] = [line for line in lines if line.startswith("input ")]
    assert image in start and str(out) in start and model in start and sha in start
    assert "4x32x32 uint8 ->" in start and "blocks 1x16x16: 16 in 16 shard(s), 4 task(s)" in start
    assert any(line.startswith(f"blocks run on {client.scheduler.address}") for line in lines)
    # Each tenth of the way gets a line: each task of one slice (4 blocks) is a quarter.
    progress = [line for line in lines if line.startswith("predict: ")]
    assert len(progress) == 4 and progress[-1].startswith("predict: 16 / 16 blocks (100.0%)")
    assert any(line.startswith(f"predicted {out}: 16 block(s), 4,096 voxels") for line in lines)
    assert artifact("prediction-progress").data == 100.0


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        pytest.param({"block_shape": (1, 0, 16)}, "greater than 0", id="zero-block-side"),
        pytest.param({"output_dtype": "int7"}, "uint8", id="unknown-dtype"),
        pytest.param({"precision": "int4"}, "bfloat16", id="unknown-precision"),
        pytest.param(
            {"shard_shape": (2, 16)},
            "options.shard_shape.2: Field required",
            id="shard-of-two-axes",
        ),
        pytest.param({"stall_after": -1}, "greater than 0", id="negative-stall"),
    ],
)
def test_predict_flow_refuses_bad_parameters_before_running(
    tmp_path: Path, parameters: dict[str, Any], message: str
) -> None:
    with pytest.raises(ParameterTypeError, match=message):
        predict_flow("in.zarr", "m.pt", str(tmp_path / "out.zarr"), parameters)
    assert not (tmp_path / "out.zarr").exists()


def test_ingest_flow_predicts_each_new_volume_once(client: Client, tmp_path: Path) -> None:
    landing, outputs = tmp_path / "landing", tmp_path / "predictions"
    landing.mkdir()
    write_zarr(landing / "a.zarr", blob_volume((2, 32, 32), seed=1))
    tifffile.imwrite(landing / "b.tif", blob_volume((2, 32, 32), seed=2))
    (landing / "notes.txt").write_text("not a volume")
    model = tiny_model(tmp_path / "m.pt")
    run = {"scheduler": client.scheduler.address, "settle_seconds": 0}
    versions = len(artifacts("ingest-run"))

    first = ingest_flow(str(landing), str(outputs), model, **run)
    assert sorted((r["output"], r["reason"]) for r in first) == [
        (str(outputs / "a.zarr"), "new"),
        (str(outputs / "b.zarr"), "new"),
    ]
    assert ingest_flow(str(landing), str(outputs), model, **run) == []  # idempotent
    assert {row["output"] for row in json.loads(artifact("ingest-run").data)} == {
        str(outputs / "a.zarr"),
        str(outputs / "b.zarr"),
    }
    for name in ("a", "b"):  # the whole chain: objects labelled into each prediction
        labelled = run_info(str(outputs / f"{name}.zarr" / "labels" / "components"))
        assert labelled is not None and labelled["complete"]
        assert (outputs / f"{name}.zarr.components.objects.parquet").exists()
    shutil.rmtree(outputs / "a.zarr" / "labels" / "components")  # labels lost: due again
    relabelled = ingest_flow(str(landing), str(outputs), model, **run)
    assert [(r["output"], r["reason"]) for r in relabelled] == [
        (str(outputs / "a.zarr"), "incomplete")
    ]
    assert run_info(str(outputs / "a.zarr" / "labels" / "components"))["complete"]  # type: ignore[index]
    # One table per scan that predicted; none for the scan that found nothing new.
    assert len(artifacts("ingest-run")) == versions + 2

    # A new model leaves finished predictions alone unless reprocessing is asked for.
    retrained = tiny_model(tmp_path / "m2.pt", seed=1)
    assert ingest_flow(str(landing), str(outputs), retrained, **run) == []
    again = ingest_flow(str(landing), str(outputs), retrained, reprocess=True, **run)
    assert sorted(r["reason"] for r in again) == ["model changed", "model changed"]
    assert ingest_flow(str(landing), str(outputs), retrained, reprocess=True, **run) == []


class FlakyFileSystem(LocalFileSystem):
    """A local folder behind a connection that drops the first listing, as a loaded object store
    does."""

    protocol = "flaky"
    failures_left = 1

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        if FlakyFileSystem.failures_left > 0:
            FlakyFileSystem.failures_left -= 1
            raise ConnectionResetError("connection reset by peer (simulated)")
        return super().ls(path, detail=detail, **kwargs)


def test_ingest_flow_retries_a_failed_read_of_the_landing_location(
    client: Client, tmp_path: Path
) -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    landing = tmp_path / "landing"
    landing.mkdir()
    write_zarr(landing / "a.zarr", blob_volume((1, 32, 32)))
    FlakyFileSystem.failures_left = 1
    done = ingest_flow(
        f"flaky://{landing}",
        str(tmp_path / "out"),
        tiny_model(tmp_path / "m.pt"),
        scheduler=client.scheduler.address,
        settle_seconds=0,
    )
    assert FlakyFileSystem.failures_left == 0  # the first scan failed ...
    assert [r["reason"] for r in done] == ["new"]  # ... and the retry found the volume


def test_train_flow_trains_evaluates_and_registers_the_model(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    image = blob_volume((4, 48, 48))
    labels = (image > 140).astype(np.uint8)
    model = Path("model.pt")
    figures = train_flow(
        write_zarr(Path("image.zarr"), image),
        write_zarr(Path("labels.zarr"), labels),
        str(model),
        TrainConfig(
            model=UNetConfig(base_channels=8, depth=2),
            tile_output=(1, 16, 16),
            steps=3,
            z_range=(0, 3),
            validation_z_range=(3, 4),
            weight_map=True,
        ),
        scheduler=client.scheduler.address,
    )
    assert (
        model.exists()
        and Path(f"{model}.curve.png").exists()
        and Path(f"{model}.preview.png").exists()
    )
    assert figures["steps"] == 3 and 0 <= figures["validation_pixel_error"] <= 1
    assert run_info(f"{model}.evaluation.zarr")["complete"]  # type: ignore[index]
    assert metrics("model-metrics")["checkpoint"] == str(tmp_path / model)
    # The model card shows the learning curve and the validation preview inline.
    card = artifact("model-card")
    assert len(embedded_images(card.data)) == 2 and "file://" not in card.data
    # The weight map and the training told how far they were, to the end.
    assert artifact("weights-progress").data == artifact("training-progress").data == 100.0


PREFECT_YAML = Path(__file__).parents[1] / "deploy" / "prefect.yaml"


def nullable(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null" or {"type": "null"} in schema.get("anyOf", [])


@pytest.mark.parametrize("flow", [predict_flow, train_flow, ingest_flow], ids=lambda f: f.name)
def test_optional_flow_parameters_offer_none_in_the_run_form_only_where_it_is_the_default(
    flow: Any,
) -> None:
    # The UI's run form fills each field with the schema's default and checks it against the
    # field's types: a None default needs the null type there, or the form cannot be submitted
    # (scripts/prefect_screenshots.py submits it in a browser). A parameter with a real default
    # shows only its own type, not a switch to "None" ('Property is type "None"').
    properties = flow.parameters.model_dump()["properties"]
    for name, schema in properties.items():
        assert nullable(schema) == (schema.get("default", 0) is None), name
    for record in flow.parameters.model_dump().get("definitions", {}).values():
        for name, schema in record["properties"].items():
            assert nullable(schema) == (schema.get("default", 0) is None), name
    # The training budget defaults to None: TrainConfig's 3 minutes, or no limit with steps.
    if flow is train_flow:
        minutes = flow.parameters.model_dump()["definitions"]["TrainConfig"]["properties"][
            "minutes"
        ]
        assert nullable(minutes) and "--steps" in minutes["description"]
        required = dict.fromkeys(flow.parameters.required, "x")
        config = flow.validate_parameters({**required, "config": {"steps": 5000}})["config"]
        assert config.minutes is None and config.time_budget is None


@pytest.mark.parametrize("flow", [predict_flow, train_flow, ingest_flow], ids=lambda f: f.name)
def test_every_flow_parameter_is_described_where_the_ui_shows_it(flow: Any) -> None:
    # The deployment form shows the schema's descriptions beside the fields.
    schema = flow.parameters.model_dump()
    properties = schema["properties"]
    undescribed = [name for name, field in properties.items() if not field.get("description")]
    assert not undescribed
    # The options the CLI also has are described in the CLI's words, from one place: the
    # record's fields, each with its help, in the form's section for the record.
    records = {
        predict_flow: [PredictOptions],
        train_flow: [TrainConfig, UNetConfig],
        ingest_flow: [],
    }[flow]
    for record_type in records:
        record = schema["definitions"][record_type.__name__]["properties"]
        assert set(record) == {f.name for f in dataclasses.fields(record_type)}
        for name, field in record.items():
            if name != "model":  # the nested network: its own section
                assert field["description"] == field_help(record_type, name), name


@pytest.mark.parametrize("name", ["ingest", "predict", "train"])
def test_prefect_yaml_deployment_loads_its_flow_with_valid_parameters(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a worker does after the pull step: entrypoints are relative to the checkout.
    monkeypatch.chdir(PREFECT_YAML.parents[1])
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    [spec] = [d for d in deployments if d["entrypoint"].startswith(f"flows/{name}.py:")]
    loaded = load_flow_from_entrypoint(spec["entrypoint"])
    assert loaded.name == name and spec["work_pool"]["name"] == "unet-volume"
    # Named apart from the served deployments ("served"), so neither replaces the other.
    assert (spec["name"], spec["version"], spec["tags"]) == ("pool", __version__, ["unet-volume"])
    required = {
        p for p, info in loaded.parameters.properties.items() if p in loaded.parameters.required
    }
    parameters = {
        **dict.fromkeys(required, "x"),
        **spec["parameters"],
    }  # required values come per run
    assert set(parameters) <= set(loaded.parameters.properties), (
        "a parameter the flow does not take"
    )
    loaded.validate_parameters(parameters)  # raises ParameterTypeError on a bad value
    # The server checks a deployment's parameters against the JSON schema too.
    assert not validate(parameters, loaded.parameters.model_dump(), ignore_required=True)
    for schedule in spec.get("schedules", []):
        # Prefect validates the expression and the zone on construction (ValueError if bad);
        # the parsed schedule must keep both as written.
        parsed = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert (parsed.cron, parsed.timezone) == (schedule["cron"], schedule["timezone"])


def test_predict_flow_fails_bad_input_at_once_without_retrying(tmp_path: Path) -> None:
    # A missing input is not transient: retrying it would only delay the one-line error.
    state = predict_flow(
        str(tmp_path / "missing.zarr"),
        tiny_model(tmp_path / "m.pt"),
        str(tmp_path / "out.zarr"),
        return_state=True,
    )
    assert state.is_failed()
    with get_client(sync_client=True) as api:
        runs = api.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    plan_run = next(run for run in runs if run.task_key.startswith("plan"))
    assert plan_run.run_count == 1
    with pytest.raises(
        InputError, match="does not exist; pass a Zarr array, a TIFF stack, a folder of TIFFs"
    ):
        state.result()
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        pytest.param("/data/v1.zarr", "/data/v1.preview.png", id="local"),
        pytest.param("/data/v1.zarr/", "/data/v1.preview.png", id="trailing-slash"),
        pytest.param("s3://bucket/v1.zarr", "v1.preview.png", id="url-to-working-folder"),
    ],
)
def test_predict_flow_preview_goes_beside_a_local_output(out: str, expected: str) -> None:
    assert default_preview(out) == expected


# --- bad input through the flows: refused before any task, one line, nothing written -------------

FlowCall = Callable[[dict[str, str], Path], Any]

ONE_STEP = {"steps": 1, "model": {"depth": 2}}
FLOW_CASES: list[tuple[str, FlowCall, type[Exception], str]] = [
    (
        "predict-missing-image",
        lambda f, r: predict_flow(str(r / "nope.zarr"), f["model"], str(r / "out.zarr")),
        InputError,
        "does not exist",
    ),
    (
        "predict-image-with-a-newline",
        lambda f, r: predict_flow(f["image"] + "\n", f["model"], str(r / "out.zarr")),
        InputError,
        "image '/",
    ),
    (
        "predict-unknown-protocol",
        lambda f, r: predict_flow(f["image"], f["model"], "nosuch://bucket/out.zarr"),
        InputError,
        "out 'nosuch://bucket/out.zarr' uses nosuch://, which no installed filesystem reads",
    ),
    (
        "predict-empty-model-path",
        lambda f, r: predict_flow(f["image"], "", str(r / "out.zarr")),
        InputError,
        "model '' is not a path",
    ),
    (
        "predict-not-a-model",
        lambda f, r: predict_flow(f["image"], str(r / "not-a-model.pt"), str(r / "out.zarr")),
        CheckpointError,
        "not a unet-volume checkpoint",
    ),
    (
        "predict-pickle-with-code",
        lambda f, r: predict_flow(f["image"], str(r / "pickle.pt"), str(r / "out.zarr")),
        CheckpointError,
        "pickle.pt",
    ),
    (
        "predict-channels",
        lambda f, r: predict_flow(f["image2c"], f["model"], str(r / "out.zarr")),
        InputError,
        "2 channel(s) but the model expects 1",
    ),
    (
        "predict-block-off-lattice",
        lambda f, r: predict_flow(
            f["image"], f["model"], str(r / "out.zarr"), {"block_shape": (1, 18, 16)}
        ),
        InputError,
        "period 4",
    ),
    (
        "predict-output-holds-other-data",
        lambda f, r: predict_flow(f["image"], f["model"], str(r / "busy.zarr")),
        OutputExistsError,
        "not a resumable",
    ),
    (
        "predict-zero-block-side",
        lambda f, r: predict_flow(
            f["image"], f["model"], str(r / "o.zarr"), {"block_shape": (1, 0, 16)}
        ),
        ParameterTypeError,
        "greater than 0",
    ),
    (
        "predict-unknown-dtype",
        lambda f, r: predict_flow(
            f["image"], f["model"], str(r / "o.zarr"), {"output_dtype": "int7"}
        ),
        ParameterTypeError,
        "uint8",
    ),
    (
        "predict-negative-max-failures",
        lambda f, r: predict_flow(f["image"], f["model"], str(r / "o.zarr"), {"max_failures": -1}),
        ParameterTypeError,
        "greater than or equal to 0",
    ),
    (
        "predict-not-a-scheduler-address",
        lambda f, r: predict_flow(
            f["image"], f["model"], str(r / "out.zarr"), scheduler="localhost 8786; rm -rf /"
        ),
        InputError,
        "is not a Dask address",
    ),
    (
        "ingest-missing-landing",
        lambda f, r: ingest_flow(str(r / "nowhere"), str(r / "outs"), f["model"]),
        InputError,
        "is not a folder",
    ),
    (
        "ingest-negative-settle-seconds",
        lambda f, r: ingest_flow(str(r), str(r / "outs"), f["model"], settle_seconds=-1),
        ParameterTypeError,
        "greater than or equal to 0",
    ),
    (
        "ingest-outputs-with-a-nul",
        lambda f, r: ingest_flow(str(r), str(r / "outs") + "\x00", f["model"]),
        InputError,
        "holds control characters",
    ),
    (
        "train-labels-shape",
        lambda f, r: train_flow(f["image"], f["short_labels"], str(r / "m.pt"), {"steps": 1}),
        InputError,
        "shape",
    ),
    (
        "train-negative-labels",
        lambda f, r: train_flow(f["image"], f["negative"], str(r / "m.pt"), ONE_STEP),
        InputError,
        "negative",
    ),
    (
        "train-float-labels",
        lambda f, r: train_flow(f["image"], f["float_labels"], str(r / "m.pt"), ONE_STEP),
        InputError,
        "not integers",
    ),
    (
        "train-zero-minutes",
        lambda f, r: train_flow(f["image"], f["labels"], str(r / "m.pt"), {"minutes": 0}),
        ParameterTypeError,
        "greater than 0",
    ),
    (
        "train-init-missing",
        lambda f, r: train_flow(
            f["image"], f["labels"], str(r / "m.pt"), {"steps": 1}, init=str(r / "none.pt")
        ),
        CheckpointError,
        "none.pt does not exist",
    ),
    (
        "train-model-url-unknown-protocol",
        lambda f, r: train_flow(f["image"], f["labels"], "nosuch://models/m.pt", {"steps": 1}),
        InputError,
        "model 'nosuch://models/m.pt' uses nosuch://",
    ),
]


@pytest.mark.parametrize(
    ("case", "call", "error", "named"), [pytest.param(*c, id=c[0]) for c in FLOW_CASES]
)
def test_flows_refuse_bad_input_naming_it_and_change_nothing(
    tmp_path: Path, case: str, call: FlowCall, error: type[Exception], named: str
) -> None:
    files = setup_files(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error) as raised:
        call(files, tmp_path)
    assert named in str(raised.value)
    if isinstance(raised.value, UnetVolumeError):  # ours: one line (Prefect's list each field)
        assert "\n" not in str(raised.value)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "payload-ran").exists()  # the pickle's code never ran


def test_predict_flow_nan_input_fails_keeping_finished_blocks_and_recording_the_failures(
    client: Client, tmp_path: Path
) -> None:
    files = setup_files(tmp_path)
    out = str(tmp_path / "out.zarr")
    with pytest.raises(BlockError, match="holds nan at voxel"):
        predict_flow(
            nan_image(tmp_path),
            files["model"],
            out,
            PredictOptions(block_shape=(1, 16, 16)),
            scheduler=client.scheduler.address,
        )
    status = read_status(out)
    assert not status.complete and status.done > 0 and status.failures
    assert all(failure.index[0] == 1 for failure in status.failures)  # the NaN is in slice 1
