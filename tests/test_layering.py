"""The import graph: folders are layers, each imports only its own and those below it.

The package's folders, from the bottom up::

    (top-level modules)   the vocabulary: geometry, tiling, grid, errors, label offset, ...
    io                    where volumes live and how they are read
    cluster               Dask clients, cluster specs, the workers' processes
    output                what a run writes and records
    instances             instance labels, the object table
    models                the U-Net, its checkpoints, the shipped models
    zoo                   models to and from bioimage.io packages
    prediction            plan, tasks, a task's work, the engine, the run
    training              sampling, augmentation, weight maps, the loop
    evaluation            scores against labels
    cli                   the command line
    testing               helpers for tests and benchmarks (nothing in the package imports it)

A vocabulary module imports only the vocabulary; a module in a folder imports its own folder and
the folders below it; the graph has no circle, even through imports inside functions. Only the
modules in :data:`TORCH` import torch, so planning, storage and the cluster tooling import in a
fraction of a second and run where torch is not installed.
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

LAYERS = [
    "",  # the vocabulary: modules at the package's top
    "io",
    "cluster",
    "output",
    "instances",
    "models",
    "zoo",
    "prediction",
    "training",
    "evaluation",
    "cli",
    "testing",
]

TORCH = {
    "unet_volume.models.architecture",
    "unet_volume.models.unet",
    "unet_volume.models.checkpoint",
    "unet_volume.models.ensemble",
    "unet_volume.prediction.model_predictor",
    "unet_volume.prediction.plan",  # it reads the checkpoint (torch.load)
    "unet_volume.prediction.run",
    "unet_volume.training.loop",
    "unet_volume.training.start",
    "unet_volume.training.tile_stream",
    "unet_volume.testing",
    "unet_volume.testing.stores",
    "unet_volume.zoo.documentation",
    "unet_volume.zoo.export",
    "unet_volume.zoo.samples",
    "unet_volume.zoo.weights",
}


def module_name(path: Path) -> str:
    """``unet_volume.io.volumes`` for ``unet_volume/io/volumes.py`` (a package: its folder)."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path
    for path in sorted(PACKAGE_DIR.rglob("*.py"))
    if path.name != "__main__.py"
}


def layer_of(module: str) -> str:
    """The folder ``module`` lives in ("" for the vocabulary and the package root)."""
    parts = module.split(".")[1:]
    if not parts or (len(parts) == 1 and not (PACKAGE_DIR / parts[0]).is_dir()):
        return ""
    return parts[0]


def test_layering_every_module_lives_in_a_known_layer() -> None:
    assert {layer_of(m) for m in MODULES} == set(LAYERS)
    assert set(MODULES) >= TORCH


def test_layering_core_modules_import_without_torch(tmp_path: Path) -> None:
    # A fresh interpreter: this test process has imported torch long ago.
    free = sorted(set(MODULES) - TORCH)
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {free!r}:
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
    path = MODULES[module]
    return source_imports(path.read_text(), filename=path.name)


def source_imports(source: str, *, filename: str = "<source>") -> set[str]:
    """The package modules a module's ``source`` imports, at top level or inside functions:
    for ``from package import name``, the module ``package.name`` where there is one."""
    tree = ast.parse(source, filename=filename)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("unet_volume"):
                found.add(name)
    return found


@pytest.mark.parametrize("module", [pytest.param(m, id=m) for m in MODULES])
def test_layering_each_folder_imports_only_itself_and_the_folders_below(module: str) -> None:
    mine = LAYERS.index(layer_of(module))
    above = {
        other
        for other in package_imports(module) - {"unet_volume"}
        if LAYERS.index(layer_of(other)) > mine or (mine == 0 and layer_of(other) != "")
    }
    assert not above, f"{module} ({layer_of(module) or 'vocabulary'}) imports {sorted(above)}"


def test_layering_the_import_graph_has_no_circle() -> None:
    graph = {m: package_imports(m) - {m, "unet_volume"} for m in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            assert state.get(other) != "open", " -> ".join([*path, module, other])
            if other not in state:
                visit(other, [*path, module])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [])


def test_layering_import_scanner_finds_imports_inside_functions() -> None:
    # Every absolute form, two of them hidden inside a function as the CLI hides its heavy ones;
    # `from unet_volume import UNet` names no module, so it counts as the package root.
    source = textwrap.dedent("""
        import unet_volume.geometry
        from unet_volume.errors import InputError
        from unet_volume.io import volumes
        from unet_volume.io.volumes import read_box
        from unet_volume import UNet
        import numpy

        def run():
            from unet_volume.prediction.run import predict_volume
            import unet_volume.cluster.spec as specs
    """)
    assert source_imports(source) == {
        "unet_volume.geometry",
        "unet_volume.errors",
        "unet_volume.io.volumes",
        "unet_volume",
        "unet_volume.prediction.run",
        "unet_volume.cluster.spec",
    }


def test_layering_no_module_imports_relatively() -> None:
    relative = [
        f"{m}:{node.lineno}"
        for m, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert not relative


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


@pytest.mark.parametrize("path", [pytest.param(p, id=m) for m, p in MODULES.items()])
def test_layering_library_never_imports_prefect_or_the_flows(path: Path) -> None:
    assert not import_roots(path) & {"prefect", "unet_volume_flows"}, path.name


SHELL_MODULES = {"subprocess", "pty", "pexpect"}
SHELL_CALLS = {"system", "popen", "execv", "execvp", "execl", "execlp", "spawnv", "spawnl"}


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, id=str(p.relative_to(PACKAGE_DIR.parent)))
        for p in sorted([*PACKAGE_DIR.rglob("*.py"), *FLOWS_DIR.glob("*.py")])
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


def test_layering_the_architecture_a_package_carries_imports_torch_alone() -> None:
    # bioimage.io consumers import architecture.py by itself, with no unet-volume installed.
    tree = ast.parse(MODULES["unet_volume.models.architecture"].read_text())
    imported = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert imported == {"torch", "typing"}
