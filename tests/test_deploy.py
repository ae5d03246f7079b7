"""Deployment as data: cluster specs, Kubernetes manifests and the worker image render for real.

Every spec in ``deploy/clusters`` loads; the local one starts a real LocalCluster, the SLURM one
renders a real dask-jobqueue job script (no SLURM needed), and the Kubernetes manifests validate
against the CRD schemas shipped inside dask-kubernetes. What no test here can do is start
pods or SLURM jobs; those run at a site.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import operator
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import dask_kubernetes
import jsonschema
import pytest
import yaml
from dask_jobqueue import SLURMCluster
from distributed import Client, LocalCluster
from packaging.requirements import Requirement

from unet_volume.cluster.client import TASKS_PER_GPU, StorageOptions
from unet_volume.cluster.spec import (
    DIRECTORY_VARIABLE,
    ONE_ARENA,
    WORKER_PROFILE_OFF,
    ClusterSpec,
    load_cluster_spec,
    make_cluster,
)
from unet_volume.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SPECS = sorted((DEPLOY / "clusters").glob("*.yaml"))
CRDS = (
    Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
)
MANIFESTS = [
    pytest.param("daskcluster.yaml", "daskcluster.yaml", id="daskcluster"),
    pytest.param("gpu-workergroup.yaml", "daskworkergroup.yaml", id="gpu-workergroup"),
]
# Only these enter the worker image: no .venv, runs/ or data/.
IMAGE_SOURCES = ["pyproject.toml", "README.md", "unet_volume/", "flows/", "deploy/"]


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def closed(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, not pruned.

    The API server silently drops fields its schema does not name, so a misspelt key
    (``tolerations`` as ``toleration``) would vanish without an error; here it fails.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@functools.cache
def crd_validator(crd_file: str) -> jsonschema.Draft4Validator:
    crd = read_yaml(CRDS / crd_file)
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = closed(version["schema"]["openAPIV3Schema"])
    # The API server checks these itself; the CRD schema only covers spec and status.
    schema["properties"] |= {
        "apiVersion": {"enum": ["kubernetes.dask.org/v1"]},
        "kind": {"enum": [crd["spec"]["names"]["kind"]]},
        "metadata": {"type": "object"},
    }
    return jsonschema.Draft4Validator(schema)


def worker_container(manifest: dict[str, Any]) -> dict[str, Any]:
    [container] = manifest["spec"]["worker"]["spec"]["containers"]
    return container


def has_run(items: list[str], run: list[str]) -> bool:
    return any(items[i : i + len(run)] == run for i in range(len(items)))


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in SPECS])
def test_cluster_spec_every_deploy_spec_loads(path: Path) -> None:
    spec = load_cluster_spec(path.stem, directory=path.parent)
    assert (spec.name, spec.path) == (path.stem, path)
    assert "kind" not in spec.options and "scale" not in spec.options


def test_cluster_spec_deploy_ships_one_spec_per_target() -> None:
    assert [p.stem for p in SPECS] == ["k8s-gpu", "local-gpu", "local", "slurm-cpu", "slurm-gpu"]


def test_make_cluster_local_gpu_spec_asks_for_dask_cuda_where_it_is_missing() -> None:
    # One worker per GPU of a multi-GPU machine is dask-cuda's job; without it, say so.
    spec = load_cluster_spec(DEPLOY / "clusters/local-gpu.yaml")
    assert spec.kind == "local-cuda"
    assert spec.options["resources"] == {"GPU": 1}
    assert spec.options["threads_per_worker"] == TASKS_PER_GPU
    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed here: the missing-package message cannot be shown")
    with pytest.raises(InputError, match=r"needs dask-cuda .*pip install 'unet-volume\[cuda\]'"):
        make_cluster(spec)


def _profiles(dask_worker: Any) -> bool:
    """Whether a worker runs Dask's statistical profiler (run on the worker)."""
    return "profile" in dask_worker.periodic_callbacks


def test_make_cluster_local_spec_starts_a_cluster_that_runs_tasks() -> None:
    spec = load_cluster_spec(DEPLOY / "clusters/local.yaml")
    # Start empty, then let `scale` ask for the one worker: fast, and it exercises scale.
    small = dataclasses.replace(spec, options=spec.options | {"n_workers": 0}, scale=1)
    inherited = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    with make_cluster(small) as cluster, Client(cluster) as client:
        assert isinstance(cluster, LocalCluster)
        # make_cluster waits for the local workers `scale` asked for: the worker is already here.
        assert list(client.nthreads().values()) == [1]
        assert client.submit(operator.add, 1, 2).result() == 3
        # The nanny adds no MALLOC_TRIM_THRESHOLD_ of its own (65536 slows torch ~40%). A worker
        # still inherits one that an earlier default-configured nanny wrote into os.environ.
        assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [inherited]
        # No statistical profiler: it would keep an hour of stack samples in the worker.
        assert list(client.run(_profiles).values()) == [False]
        # One malloc arena: freed memory stays resident in one arena per thread otherwise.
        assert list(client.run(os.environ.get, "MALLOC_ARENA_MAX").values()) == ["1"]


def test_make_cluster_slurm_spec_renders_one_gpu_worker_per_job() -> None:
    spec = load_cluster_spec("slurm-gpu", directory=DEPLOY / "clusters")
    assert spec.scale == 4
    # No jobs (scale=None), and the scheduler only on loopback: no SLURM is needed.
    local = dataclasses.replace(
        spec,
        scale=None,
        options=spec.options
        | {"scheduler_options": {"host": "127.0.0.1", "dashboard_address": ":0"}},
    )
    with make_cluster(local) as cluster:
        assert isinstance(cluster, SLURMCluster)
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script
    worker_line = script.strip().splitlines()[-1]
    # Four Dask threads: tasks take a quarter of the GPU each, one on it, three reading/writing.
    assert f"--nthreads {TASKS_PER_GPU} " in worker_line
    assert "--resources GPU=1" in worker_line
    assert "--nworkers" not in worker_line  # one worker process per job (processes: 1)
    assert f"export {WORKER_PROFILE_OFF}" in script.splitlines()
    assert f"export {ONE_ARENA}" in script.splitlines()


@pytest.mark.parametrize(("manifest_file", "crd_file"), MANIFESTS)
def test_k8s_manifest_validates_against_the_operator_crd(manifest_file: str, crd_file: str) -> None:
    manifest = read_yaml(DEPLOY / "k8s" / manifest_file)
    crd_validator(crd_file).validate(manifest)
    container = worker_container(manifest)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert has_run(container["args"], ["--resources", "GPU=1"])
    assert has_run(container["args"], ["--nthreads", str(TASKS_PER_GPU)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Quantities are strings in the CRD: an unquoted 1 is refused by the API server.
        pytest.param({"nvidia.com/gpu": 1}, "is not of type 'string'", id="integer-quantity"),
        # A misspelt field would be pruned silently by Kubernetes; the closed schema refuses it.
        pytest.param({"limit": {}}, "Additional properties", id="unknown-field"),
    ],
)
def test_k8s_manifest_validation_rejects_what_the_api_server_would_drop(
    change: dict[str, Any], message: str
) -> None:
    manifest = read_yaml(DEPLOY / "k8s/daskcluster.yaml")
    resources = worker_container(manifest)["resources"]
    if "limit" in change:
        resources.update(change)
    else:
        resources["limits"].update(change)
    with pytest.raises(jsonschema.ValidationError, match=message):
        crd_validator("daskcluster.yaml").validate(manifest)


def test_k8s_manifests_agree_on_cluster_name_image_and_scheduler_ports() -> None:
    cluster = read_yaml(DEPLOY / "k8s/daskcluster.yaml")
    group = read_yaml(DEPLOY / "k8s/gpu-workergroup.yaml")
    spec = load_cluster_spec(DEPLOY / "clusters/k8s-gpu.yaml")
    name = cluster["metadata"]["name"]
    # KubeCluster takes the name from the manifest; the spec's `name` must not disagree.
    assert spec.options["name"] == group["spec"]["cluster"] == name
    assert cluster["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    [scheduler] = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert (
        scheduler["image"] == worker_container(cluster)["image"] == worker_container(group)["image"]
    )
    ports = {
        port["name"]: port["port"] for port in cluster["spec"]["scheduler"]["service"]["ports"]
    }
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    assert "nvidia.com/gpu" not in scheduler["resources"].get("limits", {})


def test_load_cluster_spec_resolves_manifest_paths_against_the_spec_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # far from deploy/: "../k8s/..." must not depend on the cwd
    spec = load_cluster_spec(DEPLOY / "clusters/k8s-gpu.yaml")
    assert spec.options["custom_cluster_spec"] == str(DEPLOY / "k8s/daskcluster.yaml")


def test_load_cluster_spec_finds_bare_names_in_the_environment_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mine.yaml").write_text("kind: slurm\nqueue: gpu-long\nscale: 2\n")
    monkeypatch.setenv(DIRECTORY_VARIABLE, str(tmp_path))
    assert load_cluster_spec("mine") == ClusterSpec(
        "mine", "slurm", {"queue": "gpu-long"}, 2, tmp_path / "mine.yaml"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "kind: pbs\n",
            r"has kind 'pbs'; set 'kind:' to one of local, local-cuda, slurm, kubernetes",
            id="unknown-kind",
        ),
        pytest.param("cores: 4\n", r"has kind None; set 'kind:' to one of", id="missing-kind"),
        pytest.param(
            "- kind: local\n",
            r"must be a YAML mapping, got list .*; write keys such as 'kind: local'",
            id="not-a-mapping",
        ),
        pytest.param("kind: [local\n", r"is not valid YAML \(.*\); fix the file", id="yaml-error"),
        pytest.param(
            "kind: local\nscale: -1\n",
            r"has scale -1; set 'scale:' to a worker count",
            id="negative-scale",
        ),
        pytest.param(
            "kind: slurm\nadapt: {minimum: 4, maximum: 2}\n",
            r"has adapt .*; write e.g. 'adapt: \{minimum: 0, maximum: 8\}'",
            id="adapt-minimum-above-maximum",
        ),
        pytest.param(
            "kind: slurm\nadapt: 8\n",
            r"has adapt 8; write e.g.",
            id="adapt-not-a-mapping",
        ),
        pytest.param(
            "kind: slurm\nscale: 2\nadapt: {maximum: 8}\n",
            r"has both scale and adapt; keep one",
            id="scale-and-adapt",
        ),
        pytest.param(
            "kind: local\nstorage_options: {endpoint_url: http://s3.example}\n",
            r"has storage_options of the wrong shape; write a mapping per protocol, e.g.",
            id="storage-options-not-per-protocol",
        ),
    ],
)
def test_load_cluster_spec_rejects_bad_files_naming_the_fix(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        load_cluster_spec(path)
    assert "\n" not in str(caught.value)


def test_load_cluster_spec_adapt_is_read_and_an_adaptive_spec_from_zero_starts_empty(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.yaml").write_text("kind: local\nn_workers: 0\nadapt: {minimum: 0, maximum: 2}\n")
    spec = load_cluster_spec(tmp_path / "a.yaml")
    assert (spec.adapt, spec.scale, spec.starts_empty) == ({"minimum": 0, "maximum": 2}, None, True)
    assert "adapt" not in spec.options


def test_load_cluster_spec_storage_options_are_kept_apart_and_out_of_its_repr(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.yaml").write_text(
        "kind: local\nn_workers: 1\nstorage_options:\n  s3: {profile: lab, secret: hush}\n"
    )
    spec = load_cluster_spec(tmp_path / "s.yaml")
    assert spec.storage_options == {"s3": {"profile": "lab", "secret": "hush"}}
    assert "storage_options" not in spec.options  # not for the cluster's constructor
    assert "hush" not in repr(spec) and "hush" not in repr(StorageOptions(spec.storage_options))


def test_make_cluster_slurm_cpu_spec_renders_loopback_workers_that_die_with_their_scheduler() -> (
    None
):
    spec = load_cluster_spec("slurm-cpu", directory=DEPLOY / "clusters")
    with make_cluster(dataclasses.replace(spec, scale=None)) as cluster:  # no jobs submitted
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    assert "#SBATCH -p cpu" in script and "#SBATCH --mem=2G" in script
    worker_line = script.strip().splitlines()[-1]
    assert "--nthreads 1 " in worker_line and "--death-timeout 30" in worker_line
    assert "--interface lo" in worker_line
    assert f"export {WORKER_PROFILE_OFF}" in script.splitlines()
    assert f"export {ONE_ARENA}" in script.splitlines()


def test_load_cluster_spec_unknown_name_lists_the_available_ones() -> None:
    # "slurm" is a kind, not a spec name: the message lists the names that exist.
    with pytest.raises(
        InputError,
        match=r"unknown cluster spec 'slurm'.*pass one of k8s-gpu, local, local-gpu, slurm-cpu, "
        r"slurm-gpu",
    ):
        load_cluster_spec("slurm", directory=DEPLOY / "clusters")


def test_load_cluster_spec_missing_file_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not exist; pass an existing YAML file"):
        load_cluster_spec(tmp_path / "nowhere.yaml")


def test_dockerfile_copies_only_the_listed_sources_and_they_exist() -> None:
    dockerfile = (DEPLOY / "docker/Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(.+)$", dockerfile, flags=re.MULTILINE)
    sources = [source for line in copies for source in line.split()[:-1]]
    assert sources == IMAGE_SOURCES
    assert all((ROOT / source).exists() for source in sources)
    assert "pip install --no-cache-dir ." in dockerfile
    assert WORKER_PROFILE_OFF in dockerfile.split()  # ENV: no worker profiler in the image
    assert ONE_ARENA in dockerfile.split()


def test_dockerfile_base_image_torch_satisfies_the_package_range() -> None:
    # pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime -> torch 2.5.1, so pip keeps the CUDA build.
    [tag] = re.findall(
        r"^FROM pytorch/pytorch:(\S+)-runtime$",
        (DEPLOY / "docker/Dockerfile").read_text(),
        flags=re.MULTILINE,
    )
    version = tag.split("-")[0]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch] = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    assert torch.specifier.contains(version)
