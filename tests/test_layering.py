"""The import graph: layers import downwards only, and the torch-free core stays torch-free.

Imports form a DAG::

    geometry <- tiling <- store_retries <- locations <- storage <- run_record <- output_run
             <- prediction_store <- predict <- cli
    (errors and border are leaves that every layer may import; registration, beside border,
    is how storage and augment move an image onto its labels)

Only ``model``, ``checkpoint``, ``train`` and ``predict`` import torch, so planning, storage and
the cluster tooling import in a fraction of a second and run where torch is not installed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import unet_volume

PACKAGE_DIR = Path(unet_volume.__file__).parent

TORCH_FREE = [
    "unet_volume",
    "unet_volume.errors",
    "unet_volume.geometry",
    "unet_volume.border",
    "unet_volume.registration",
    "unet_volume.tiling",
    "unet_volume.layout",
    "unet_volume.chunk_cache",
    "unet_volume.storage",
    "unet_volume.task_plan",
    "unet_volume.formats",
    "unet_volume.locations",
    "unet_volume.store_retries",
    "unet_volume.prediction_store",
    "unet_volume.run_record",
    "unet_volume.output_run",
    "unet_volume.block_memory",
    "unet_volume.cluster",
    "unet_volume.heap",
    "unet_volume.task_window",
    "unet_volume.metrics",
    "unet_volume.evaluation",
    "unet_volume.augment",
    "unet_volume.spatial_transform",
    "unet_volume.weight_map",
    "unet_volume.weight_volume",
    "unet_volume.preview",
    "unet_volume.landing",
    "unet_volume.cluster_spec",
    "unet_volume.options",
    "unet_volume.unet_config",
    "unet_volume.predict_config",
    "unet_volume.train_config",
    "unet_volume.shipped_models",
    "unet_volume.components",
    "unet_volume.instances",
    "unet_volume.instance_passes",
    "unet_volume.objects",
    "unet_volume.watershed",
    "unet_volume.pyramid",
    "unet_volume.ome",
    # The command line parses and says --help without torch; commands import it when they run.
    "unet_volume.cli",
    "unet_volume.cli_common",
    "unet_volume.cli_train",
    "unet_volume.cli_segment",
]

# What each lower-layer module may import from the package: the layers below it, and the leaf
# `errors`. "__init__" is the package root, which imports nothing of ours eagerly.
ALLOWED_IMPORTS = {
    "errors": set(),
    "geometry": set(),
    "progress": set(),
    "border": set(),
    "registration": {"errors"},
    "tiling": {"errors", "geometry"},
    "layout": {"errors", "geometry"},
    "store_retries": {"errors"},
    "locations": {"errors", "store_retries"},
    "formats": {"errors", "locations", "store_retries"},
    "chunk_cache": {"geometry"},
    "storage": {
        "errors",
        "geometry",
        "tiling",
        "border",
        "locations",
        "formats",
        "registration",
        "chunk_cache",
    },
    "task_plan": {"geometry", "layout", "registration", "storage", "tiling"},
    "run_record": {"errors", "geometry", "storage", "locations", "formats"},
    "output_run": {"errors", "geometry", "storage", "locations", "run_record"},
    "block_memory": {"errors", "unet_config"},
    "prediction_store": {
        "errors",
        "geometry",
        "layout",
        "tiling",
        "storage",
        "locations",
        "run_record",
        "output_run",
        "__init__",
    },
    "metrics": {"errors"},
    "evaluation": {
        "errors",
        "storage",
        "formats",
        "locations",
        "prediction_store",
        "metrics",
        "__init__",
    },
    "spatial_transform": {"border", "augment"},
    "augment": {"errors", "border", "registration", "spatial_transform"},
    "weight_map": {"errors", "geometry", "options"},
    "weight_volume": {
        "progress",
        "errors",
        "geometry",
        "tiling",
        "storage",
        "locations",
        "run_record",
        "output_run",
        "prediction_store",
        "predict_config",
        "block_memory",
        "cluster",
        "task_window",
        "weight_map",
    },
    "preview": {"errors", "geometry", "storage", "formats", "prediction_store"},
    "landing": {"errors", "formats", "locations", "output_run"},
    "cluster": {"errors", "cluster_spec", "heap"},
    "heap": set(),
    "task_window": {"errors"},
    "cluster_spec": {"errors"},
    "options": set(),
    "unet_config": {"errors", "options"},
    "predict_config": {"options", "prediction_store"},
    "train_config": {
        "errors",
        "options",
        "augment",
        "registration",
        "storage",
        "tiling",
        "unet_config",
    },
    "shipped_models": {"errors", "watershed"},
    "components": {"errors", "geometry"},
    "objects": {"errors", "geometry", "locations"},
    "watershed": {"errors"},
    "pyramid": {"errors", "geometry", "heap", "output_run", "task_window"},
    "ome": {"geometry", "output_run", "pyramid"},
    "instance_passes": {
        "heap",
        "components",
        "geometry",
        "objects",
        "output_run",
        "prediction_store",
        "run_record",
        "storage",
        "task_window",
        "watershed",
    },
    "instances": {
        "instance_passes",
        "ome",
        "watershed",
        "objects",
        "components",
        "errors",
        "geometry",
        "locations",
        "output_run",
        "prediction_store",
        "run_record",
        "storage",
    },
}
UPPER_LAYERS = {
    "predict",
    "engine",
    "model",
    "checkpoint",
    "train",
    "train_start",
    "cli",
    "cli_train",
    "cli_segment",
    "tile_stream",
}


def test_layering_core_modules_import_without_torch(tmp_path: Path) -> None:
    # A fresh interpreter: this test process has imported torch long ago.
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {TORCH_FREE!r}:
            importlib.import_module(name)
            torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
            if torch:
                sys.exit(f"importing {{name}} imported {{torch[:3]}}")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_layering_public_names_resolve() -> None:
    # `from unet_volume import ...` works for every public name; torch-backed ones load on first
    # use.
    assert {"UNet", "save_model", "load_model", "predict_volume", "open_prediction"} <= set(
        unet_volume.__all__
    )
    for name in unet_volume.__all__:
        assert getattr(unet_volume, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'predict_voluem'"):
        _ = unet_volume.predict_voluem  # type: ignore[attr-defined]


def package_imports(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (top level or in functions)."""
    return source_imports((PACKAGE_DIR / f"{module}.py").read_text(), filename=f"{module}.py")


def source_imports(source: str, *, filename: str = "<source>") -> set[str]:
    """The package modules a module's ``source`` imports, at top level or inside functions."""
    tree = ast.parse(source, filename=filename)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif (
            isinstance(node, ast.ImportFrom) and node.level > 0
        ):  # `from .x import y`, `from . import x`
            names = (
                [f"unet_volume.{node.module}"]
                if node.module
                else [f"unet_volume.{a.name}" for a in node.names]
            )
        elif (
            isinstance(node, ast.ImportFrom) and node.module == "unet_volume"
        ):  # `from unet_volume import x`
            names = [f"unet_volume.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "unet_volume":
                continue
            submodule = parts[1] if len(parts) > 1 else "__init__"
            found.add(submodule if (PACKAGE_DIR / f"{submodule}.py").exists() else "__init__")
    return found


@pytest.mark.parametrize(
    "module",
    [pytest.param(module, id=module) for module in ALLOWED_IMPORTS],
)
def test_layering_lower_layers_import_only_downwards(module: str) -> None:
    imported = package_imports(module)
    assert not imported & UPPER_LAYERS, f"{module} imports {sorted(imported & UPPER_LAYERS)}"
    assert imported <= ALLOWED_IMPORTS[module], (
        f"{module} imports {sorted(imported - ALLOWED_IMPORTS[module])}"
    )


def test_layering_import_scanner_finds_imports_inside_functions() -> None:
    # Every import form, two of them hidden inside a function as the CLI hides its heavy ones;
    # `from unet_volume import UNet` names no module, so it counts as the package root.
    source = textwrap.dedent("""
        import unet_volume.geometry
        from unet_volume.errors import InputError
        from . import tiling
        from .storage import read_box
        from unet_volume import UNet
        import numpy

        def run():
            from unet_volume.predict import predict_volume
            import unet_volume.cluster_spec as specs
    """)
    assert source_imports(source) == {
        "geometry",
        "errors",
        "tiling",
        "storage",
        "__init__",
        "predict",
        "cluster_spec",
    }


FLOWS_DIR = Path(__file__).parents[1] / "flows"
FLOW_IMPORTS = {"prefect", "pydantic", "unet_volume", "unet_volume_flows"}


def import_roots(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=path.name)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.name) for p in sorted(FLOWS_DIR.glob("*.py"))]
)
def test_layering_flows_are_glue_over_prefect_and_the_library(path: Path) -> None:
    # Flows import Prefect (and its pydantic parameter types), the library and the stdlib: nothing
    # that computes, and no cluster settings (those are data in deploy/).
    third_party = import_roots(path) - FLOW_IMPORTS - set(sys.stdlib_module_names) - {"__future__"}
    assert not third_party, f"{path.name} imports {sorted(third_party)}"


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.name) for p in sorted(PACKAGE_DIR.glob("*.py"))]
)
def test_layering_library_never_imports_prefect_or_the_flows(path: Path) -> None:
    assert not import_roots(path) & {"prefect", "unet_volume_flows"}, path.name


SHELL_MODULES = {"subprocess", "pty", "pexpect"}
SHELL_CALLS = {"system", "popen", "execv", "execvp", "execl", "execlp", "spawnv", "spawnl"}


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, id=f"{p.parent.name}/{p.name}")
        for p in sorted([*PACKAGE_DIR.glob("*.py"), *FLOWS_DIR.glob("*.py")])
    ],
)
def test_layering_no_module_starts_a_shell_or_a_process_from_user_strings(path: Path) -> None:
    # issue 13: paths and URLs reach the flows from the UI and the API; none may reach a shell.
    # Clusters start their processes through Dask (dask-jobqueue, dask-kubernetes), never ours.
    tree = ast.parse(path.read_text(), filename=path.name)
    assert not import_roots(path) & SHELL_MODULES, path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert not (node.value.id == "os" and node.attr in SHELL_CALLS), (
                f"{path.name}:{node.lineno} calls os.{node.attr}"
            )
        if isinstance(node, ast.keyword) and node.arg == "shell":
            raise AssertionError(f"{path.name}:{node.value.lineno} passes shell=")
