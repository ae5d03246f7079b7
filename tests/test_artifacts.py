"""What the flows put in the Prefect UI: images inline within a budget, figures as rows."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_volume_flows.artifacts import embedded_image, full_size, metric_rows


def noisy_png(path: Path, shape: tuple[int, int]) -> Path:
    """A PNG that compresses badly (noise): the hardest case for the budget."""
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def decoded(markdown: str) -> Image.Image:
    encoded = markdown.split("data:image/jpeg;base64,")[1].split(")")[0]
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


@pytest.mark.parametrize("budget", [20_000, 200_000])
def test_embedded_image_fits_its_budget_however_large_the_file(tmp_path: Path, budget: int) -> None:
    png = noisy_png(tmp_path / "big.png", (2400, 3600))
    assert png.stat().st_size > 10 * budget
    markdown = embedded_image(png, "preview", budget=budget)
    encoded = markdown.split("(", 1)[1].split(")", 1)[0]
    assert len(encoded.split(",", 1)[1]) <= budget
    assert decoded(markdown).format == "JPEG" and max(decoded(markdown).size) >= 64


def test_embedded_image_keeps_a_small_image_at_its_size(tmp_path: Path) -> None:
    png = noisy_png(tmp_path / "small.png", (120, 200))
    assert decoded(embedded_image(png, "curve")).size == (200, 120)


def test_full_size_links_what_a_browser_can_fetch_and_names_the_rest() -> None:
    url = "https://data.example.org/run/out.preview.png"
    assert full_size(url) == f"Full size: [{url}]({url})"
    assert full_size("s3://bucket/out.png") == "Full size: `s3://bucket/out.png`"
    assert full_size("out.png") == f"Full size: `{Path('out.png').absolute()}`"


def test_metric_rows_read_down() -> None:
    assert metric_rows({"steps": 3, "loss": 0.5}) == [
        {"metric": "steps", "value": 3},
        {"metric": "loss", "value": 0.5},
    ]
