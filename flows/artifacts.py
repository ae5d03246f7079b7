"""What the flows show in the Prefect UI: images inline, figures as rows, locations in full.

A browser refuses ``file://`` links from a web page ("Not allowed to load local resource"), so
an image in a markdown artifact is embedded: downscaled, as a JPEG data URL that the UI renders
inline. The full-size file is linked only where a browser can fetch it (``http(s)://``);
otherwise its absolute location is printed, for a terminal.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unet_volume.io.locations import absolute
from unet_volume.output.preview import IMAGE_BUDGET, data_url


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
