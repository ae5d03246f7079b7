"""Options derived from config dataclasses: one place for each name, type, default and help.

Every option of the command line, and every parameter of a flow, is a field of a frozen config
dataclass (:class:`~unet_volume.models.config.UNetConfig`, :class:`~unet_volume.training.config.
TrainConfig`, :class:`~unet_volume.prediction.options.PredictOptions`,
:class:`~unet_volume.training.weight_map.WeightMapConfig`). A field made with :func:`option` carries
its
help text; :func:`add_options` turns the fields into ``argparse`` options and
:func:`options_from` builds the config back from the parsed arguments. So a default lives in its
dataclass alone, and a test compares the CLI, the flows and the library against it.

This module imports neither torch nor Dask: ``unet-volume --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any, TypeVar

from annotated_types import Ge, Gt

T = TypeVar("T")

# The bounds of option values, as types: pydantic checks a flow's parameters against them and
# Prefect's run form shows them; the records check the values again, with the fix.
Count = Annotated[int, Gt(0)]
"""A number of things (steps, tiles, voxels along an axis): at least 1."""
Natural = Annotated[int, Ge(0)]
"""At least 0 (a seed, a slice index, a number of extra processes)."""
Size = Annotated[float, Gt(0)]
"""A positive amount (minutes, seconds, a voxel's size, a learning rate)."""
Shape3 = tuple[Count, Count, Count]
"""Voxels along (z, y, x), each at least 1."""


def option(default: Any, help_text: str) -> Any:
    """A dataclass field with its help text, shown by ``--help`` (``metadata["help"]``) and
    beside the field in Prefect's run form (``metadata["description"]``: pydantic, which
    builds a flow's parameter schema, takes a field's description from there)."""
    return dataclasses.field(
        default=default, metadata={"help": help_text, "description": help_text}
    )


def parse_ints(text: str) -> tuple[int, ...]:
    """``"1,512,512"`` -> ``(1, 512, 512)``."""
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,512,512, got {text!r}"
        ) from None


def parse_ints_or(*words: str) -> Callable[[str], tuple[int, ...] | str]:
    """A parser of ``"1,512,512"`` that also takes one of ``words`` (e.g. ``auto``) as is."""

    def parse(text: str) -> tuple[int, ...] | str:
        if text in words:
            return text
        try:
            return parse_ints(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers like 1,512,512 or {' or '.join(words)}, "
                f"got {text!r}"
            ) from None

    return parse


def parse_floats(text: str) -> tuple[float, ...]:
    """``"50,4,4"`` -> ``(50.0, 4.0, 4.0)``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 50,4,4, got {text!r}"
        ) from None


def parse_sigma(text: str) -> tuple[float, str]:
    """``"5"`` or ``"5px"`` -> ``(5.0, "px")`` (voxels); ``"20nm"`` -> ``(20.0, "nm")``."""
    found = re.fullmatch(r"([0-9.]+(?:e-?[0-9]+)?)\s*([a-zµ]*)", text.strip().lower())
    if not found or found[2] not in ("", "px", "nm", "um", "µm"):
        raise argparse.ArgumentTypeError(
            f"expected a length like 5 or 5px (voxels) or 20nm, got {text!r}"
        )
    return float(found[1]), found[2] or "px"


def parse_range(text: str) -> tuple[int, int]:
    """``"0:20"`` -> ``(0, 20)`` (half-open)."""
    try:
        begin, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BEGIN:END like 0:20, got {text!r}") from None
    return begin, end


# Flag names that differ from the field's name (``--dashed-name``); the first is shown in --help.
FLAGS = {
    "learning_rate": ("--lr", "--learning-rate"),
    "num_classes": ("--classes", "--num-classes"),
}


def add_options(
    p: argparse.ArgumentParser,
    defaults: Any,
    *,
    skip: Collection[str] = (),
    only: Collection[str] | None = None,
) -> None:
    """One option per field of the dataclass instance ``defaults``: name, type, default, help.

    So that each lives in the dataclass alone: the flag is ``--field-name`` (or :data:`FLAGS`),
    the default the field's value in ``defaults``, the help its ``metadata["help"]`` (see
    :func:`option`). A boolean field that defaults to True becomes ``--no-field-name``. Nested
    dataclasses and ``skip`` are left out, and, when ``only`` is given, the fields not in it.
    """
    hints = typing.get_type_hints(type(defaults))
    for f in dataclasses.fields(defaults):
        hint, default = _strip_none(hints[f.name]), getattr(defaults, f.name)
        if f.name in skip or (only is not None and f.name not in only):
            continue
        if dataclasses.is_dataclass(hint):
            continue
        text = f.metadata["help"]
        dashed = "--" + f.name.replace("_", "-")
        if hint is bool:
            flag = dashed.replace("--", "--no-") if default else dashed
            action = "store_false" if default else "store_true"
            p.add_argument(flag, dest=f.name, action=action, help=_bool_help(text, default))
            continue
        shown = "" if default is None else f" (default {show(default)})"
        p.add_argument(
            *FLAGS.get(f.name, (dashed,)),
            dest=f.name,
            default=default,
            help=text + shown,
            **_parsing(hint),
        )


def _strip_none(hint: Any) -> Any:
    """``X | None`` -> ``X``: None is the default's business, not the parser's."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    return args[0] if is_optional else hint


def _parsing(hint: Any) -> dict[str, Any]:
    """``type``, ``choices`` and ``metavar`` for values of the type ``hint``."""
    args = typing.get_args(hint)
    words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
    if words and any(typing.get_origin(a) in (tuple, Sequence) for a in args):
        return {"type": parse_ints_or(*words), "metavar": "Z,Y,X|" + "|".join(words)}
    if typing.get_origin(hint) is typing.Literal:
        return {"type": type(args[0]), "choices": args}
    if typing.get_origin(hint) is tuple and args == (int, int):
        return {"type": parse_range, "metavar": "BEGIN:END"}
    if typing.get_origin(hint) in (tuple, Sequence):
        parse = parse_floats if float in args else parse_ints
        # tuple[float, ...]: per axis of the net's, (y, x) or (z, y, x)
        return {"type": parse, "metavar": "[Z,]Y,X" if Ellipsis in args else "Z,Y,X"}
    return {"type": hint}


def show(value: object) -> str:
    """A default as ``--help`` prints it: ``1,512,512``, ``0.001``, ``adam``."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bool_help(text: str, default: bool) -> str:
    return f"do not {text}" if default else text


def options_from(args: argparse.Namespace, config_type: type[T], **values: Any) -> T:
    """``config_type`` from the options that :func:`add_options` made, and ``values``."""
    names = {f.name for f in dataclasses.fields(config_type)}  # type: ignore[arg-type]
    given = {k: v for k, v in vars(args).items() if k in names}
    return config_type(**{**given, **values})
