"""What the flows show and record: the run's log line, Prefect artifacts, provenance.

Images are shown inline, figures as rows, locations in full.

A browser refuses ``file://`` links from a web page ("Not allowed to load local resource"), so
an image in a markdown artifact is embedded: downscaled, as a JPEG data URL that the UI renders
inline. The full-size file is linked only where a browser can fetch it (``http(s)://``);
otherwise its absolute location is printed, for a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from unet_volume.evaluation.scores import EvaluationReport
from unet_volume.instances.objects import read_objects, table_url
from unet_volume.io.locations import absolute
from unet_volume.output.prediction import environment, record_provenance
from unet_volume.output.preview import IMAGE_BUDGET, data_url, write_preview
from unet_volume.prediction.engine import RunReport
from unet_volume.prediction.plan import PredictionPlan
from unet_volume.training.loop import TrainReport
from unet_volume_flows.common import STORAGE_RETRIES


def embedded_image(path: str | Path, alt: str, *, budget: int = IMAGE_BUDGET) -> str:
    """Markdown showing the image at ``path`` inline (see
    :func:`~unet_volume.output.preview.data_url`),
    then where the full-size file is."""
    return f"![{alt}]({data_url(path, budget=budget)})\n\n{full_size(path)}"


def full_size(location: str | Path) -> str:
    """A link to ``location`` where a browser can open it, else its absolute path as text."""
    where = absolute(str(location))
    if where.startswith(("http://", "https://")):
        return f"Full size: [{where}]({where})"
    return f"Full size: `{where}`"


def metric_rows(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``{"metric", "value"}`` row per figure: a table that reads down, not across."""
    return [{"metric": name, "value": value} for name, value in figures.items()]


def log_plan(planned: PredictionPlan, model: str) -> None:
    """The plan for the workers at hand, in one line of the run's log."""
    layout, volume = planned.layout, planned.volume
    get_run_logger().info(
        "input %s %s %s -> output %s; model %s (sha256 %s); blocks %s: %d in %d shard(s), "
        "%d task(s)%s",
        volume.url,
        "x".join(map(str, volume.shape)),
        volume.dtype_name,
        planned.output_url,
        model,
        planned.info.sha256[:12],
        "x".join(map(str, planned.block_shape)),
        layout.num_blocks,
        layout.num_shards,
        planned.tasks.num_tasks,
        f", {planned.existing.done} done before (resumed)" if planned.existing else "",
    )


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def record(report: RunReport, parameters: dict[str, Any]) -> None:
    """Write who made the output and how next to the data."""
    run = {
        "flow_run": str(runtime.flow_run.id),
        "flow_run_name": runtime.flow_run.name,
        "deployment": runtime.deployment.name,
    }
    record_provenance(
        report.output_url, {**run, "parameters": parameters, "environment": environment()}
    )


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def publish(report: RunReport, image: str, preview: str) -> str:
    """The run's figures as a table, and a preview of a few slices shown inline, as artifacts."""
    png = write_preview(image, report.output_url, preview)
    figures = {
        "input": absolute(image),
        "output": report.output_url,
        "blocks": report.blocks,
        "blocks resumed": report.skipped,
        "voxels": report.voxels,
        "seconds": round(report.seconds, 2),
        "Mvoxel/s": round(report.voxels_per_second / 1e6, 3),
    }
    create_table_artifact(
        metric_rows(figures),
        key="prediction-run",
        description=f"Prediction of {absolute(image)}: what ran, how long",
    )
    create_markdown_artifact(
        f"# Prediction of `{absolute(image)}`\n\nOutput: `{report.output_url}`\n\n"
        "Input with the segmentation overlaid (left), foreground probability (right):\n\n"
        f"{embedded_image(png, 'preview of the prediction')}\n",
        key="prediction-preview",
        description=f"Preview of {report.output_url}",
    )
    return str(png)


def publish_objects(labels: str, objects: int, method: str) -> None:
    """The object table's largest objects as an artifact, with where the whole table is."""
    largest = read_objects(labels).nlargest(20, "voxels").round(3)
    create_table_artifact(
        json.loads(largest.to_json(orient="records")),  # plain JSON types, not numpy's
        key="objects",
        description=f"The 20 largest of {objects:,} objects in {labels} ({method}); the whole "
        f"table: {table_url(labels)}",
    )


def default_preview(out: str) -> str:
    """Beside a local output (``out.zarr`` -> ``out.preview.png``); for a URL, in the working
    folder."""
    name = f"{PurePosixPath(out.rstrip('/')).stem}.preview.png"
    return name if "://" in out else str(Path(out.rstrip("/")).with_name(name))


@task(cache_policy=NO_CACHE)
def register(report: TrainReport, scores: EvaluationReport | None, image: str) -> dict[str, Any]:
    """The checkpoint's figures as Prefect artifacts: a metrics table, and a model card that
    shows the learning curve and a validation preview inline."""
    checkpoint = absolute(report.checkpoint)
    figures: dict[str, Any] = {
        "checkpoint": checkpoint,
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "final_loss": round(report.final_loss, 4),
    }
    lines = [
        f"# Model `{checkpoint}`",
        "",
        f"{report.steps} steps in {report.seconds / 60:.1f} min; "
        f"final loss {report.final_loss:.4f}.",
        "",
        "## Learning curve",
        "",
        embedded_image(f"{checkpoint}.curve.png", "learning curve"),
    ]
    if scores is not None:
        figures.update(
            {f"validation_{k}": round(v, 4) for k, v in scores.to_dict()["volume"].items()}
        )
        first, stop = scores.z_range
        png = write_preview(
            image, scores.prediction, f"{checkpoint}.preview.png", slices=[first, stop - 1]
        )
        lines += ["", f"## Validation, slices z {first}:{stop}", ""]
        lines.append(embedded_image(png, "validation preview"))
    create_table_artifact(
        metric_rows(figures),
        key="model-metrics",
        description=f"Figures of the model {checkpoint}",
    )
    create_markdown_artifact(
        "\n".join(lines) + "\n", key="model-card", description=f"Model card of {checkpoint}"
    )
    return figures
