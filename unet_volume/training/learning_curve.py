"""The learning curve of a training run, as numbers and as a PNG beside the checkpoint."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LearningCurve:
    """Training loss per step and validation figures every few steps."""

    losses: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(
        default_factory=list
    )  # {"step", "loss", "pixel_error"}

    def to_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "validation": self.validation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearningCurve:
        return cls(
            [float(v) for v in data.get("losses", [])],
            [dict(v) for v in data.get("validation", [])],
        )

    def png(self) -> bytes:
        """Loss (left axis) and validation pixel error (right axis), plotted as a PNG."""
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        from matplotlib import pyplot as plt

        fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
        steps = range(1, len(self.losses) + 1)
        loss_axis.plot(steps, self.losses, color="0.7", linewidth=0.6, label="training loss")
        loss_axis.plot(
            steps, _running_mean(self.losses, 20), color="C0", label="training loss (mean of 20)"
        )
        if self.validation:
            v_steps = [v["step"] for v in self.validation]
            loss_axis.plot(
                v_steps,
                [v["loss"] for v in self.validation],
                "o-",
                color="C1",
                label="validation loss",
            )
            error_axis = loss_axis.twinx()
            error_axis.plot(
                v_steps,
                [v["pixel_error"] for v in self.validation],
                "s--",
                color="C2",
                label="validation pixel error",
            )
            error_axis.set_ylabel("validation pixel error")
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("weighted cross entropy")
        lines = [line for axis in fig.axes for line in axis.get_lines()]
        loss_axis.legend(
            lines, [str(line.get_label()) for line in lines], loc="upper right", fontsize="small"
        )
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png")
        plt.close(fig)
        return image.getvalue()


def _running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each step.

    >>> _running_mean([1.0, 3.0, 5.0], 2)
    [1.0, 2.0, 4.0]
    """
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out
