"""Deployment: the Dockerfile lints clean, the Kubernetes/KubeRay manifests validate against their schemas,
and the distributed path works with real processes (multi-node Ray, `mlflow server` on PostgreSQL), faults included.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import kubernetes_validate
import mlflow
import pytest
import requests
import torch
import yaml

from fasweep.config import TrialConfig
from fasweep.data import load_data
from fasweep.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from cluster import (
    BIN,
    MlflowServer,
    RayCluster,
    free_port,
    mlflow_server,
    postgres,
    postgres_bin,
    ray_cluster,
    start,
    stop,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = {"job": DEPLOY / "overlays" / "job", "cluster": DEPLOY / "overlays" / "cluster"}
CRDS = Path(__file__).parent / "data" / "kuberay-v1-crds.yaml"
K8S_VERSION = "1.33.0"
RAY_KINDS = {"RayJob", "RayCluster"}
CLUSTER_NAMESPACED = {"Namespace"}


# --- rendering kustomize without kubectl ----------------------------------------------------------------------


def render(path: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize PATH` would print, for the features our kustomizations use:
    resources (files and directories), secretGenerator (env files; the committed `.example` stands in for a
    git-ignored one), namespace, and images, own or from components (applied to the containers of every
    kind, which components/image/kustomizeconfig.yaml tells kustomize for the KubeRay kinds).
    """
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    images = list(kust.get("images", []))
    for component in kust.get("components", []):
        images += yaml.safe_load((path / component / "kustomization.yaml").read_text()).get("images", [])
    objects: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        target = path / res
        if target.is_dir():
            objects += render(target)
        else:
            objects += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
    for gen in kust.get("secretGenerator", []):
        data: dict[str, str] = {}
        for env in gen.get("envs", []):
            env_file = path / env
            if not env_file.exists():
                env_file = env_file.with_name(env_file.name + ".example")
            for line in env_file.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = base64.b64encode(value.encode()).decode()
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "data": data})
    for obj in objects:
        if (ns := kust.get("namespace")) and obj["kind"] not in CLUSTER_NAMESPACED:
            obj["metadata"]["namespace"] = ns
    for image in images:
        for container in containers_of_all(objects):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod template in a workload or KubeRay object."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet"):
        yield "template", spec["template"]
    cluster = spec.get("rayClusterSpec", spec) if obj["kind"] in RAY_KINDS else None
    if cluster is not None:
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker:{group['groupName']}", group["template"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def containers_of_all(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for obj in objects:
        for _, template in pod_templates(obj):
            yield from template["spec"]["containers"]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return obj


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(OVERLAYS[request.param])


# --- schemas ----------------------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """Copy of an OpenAPI schema that rejects unknown fields (kubectl's default strict field validation)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    """kind -> strict v1 openAPIV3Schema of the vendored KubeRay CRDs."""
    out = {}
    for crd in yaml.safe_load(CRDS.read_text()):
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[crd["spec"]["names"]["kind"]] = strict(v1["schema"]["openAPIV3Schema"])
    return out


def validate(obj: dict[str, Any]) -> None:
    """Raise if `obj` breaks its schema: KubeRay kinds against the CRD (pod templates against core v1
    PodTemplate), everything else against the Kubernetes schema of K8S_VERSION, unknown fields rejected."""
    if obj["kind"] in RAY_KINDS:
        jsonschema.validate(obj, crd_schemas()[obj["kind"]])
        for where, template in pod_templates(obj):
            as_pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where.replace(":", "-")}}
            kubernetes_validate.validate({**as_pod_template, "template": template}, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- image -------------------------------------------------------------------------------------------------------


def test_dockerfile_lints_clean_and_pins_what_is_tested() -> None:
    hadolint = subprocess.run(
        [str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert hadolint.returncode == 0, hadolint.stdout + hadolint.stderr
    text = (REPO / "Dockerfile").read_text()
    assert f"rayproject/ray:{version('ray')}-py311-gpu" in text, "base image Ray must equal the Ray fasweep runs"
    assert 'ENTRYPOINT ["fasweep"]' in text
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", "numeric non-root USER"
    # Dependencies (from pyproject) are installed before the source is copied: a source edit keeps that layer.
    assert text.index("pip install -r requirements.txt") < text.index("COPY --chown=1000:100 fasweep")
    pins = dict(
        line.split("==") for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines() if "==" in line
    )
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        assert f"{package}=={pins[package]}" in pyproject
    for package in ("torch", "torchvision", "ray", "mlflow"):
        assert pins[package] == version(package).split("+")[0], f"{package} pin differs from the tested version"
    entries = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert entries[0] == "*" and "!fasweep/" in entries, ".dockerignore allow-lists the build context"


# --- manifests ---------------------------------------------------------------------------------------------------


def test_every_manifest_validates_against_its_schema(rendered: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service"} <= kinds
    assert kinds & RAY_KINDS
    for obj in rendered:
        validate(obj)


def test_schema_checks_can_fail() -> None:
    """The validators reject a misspelt KubeRay field, a bad enum, a pod-template typo and a core-kind typo."""
    objects = render(OVERLAYS["job"])
    job = find(objects, "RayJob")
    broken = []
    for path, value in [
        (("spec", "shutdownAfterJobFinish"), True),
        (("spec", "submissionMode"), "PodMode"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containerz"), []),
    ]:
        obj = copy.deepcopy(job)
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        broken.append(obj)
    deployment = copy.deepcopy(find(objects, "Deployment", "mlflow"))
    deployment["spec"]["replica"] = 2
    broken.append(deployment)
    for obj in broken:
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate(obj)


def ray_cluster_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    obj = next(o for o in objects if o["kind"] in RAY_KINDS)
    return obj["spec"].get("rayClusterSpec", obj["spec"])


def test_ray_cluster_shape(rendered: list[dict[str, Any]]) -> None:
    """CPU head that runs no trials; autoscaled GPU workers that tolerate GPU taints; Ray as tested."""
    spec = ray_cluster_spec(rendered)
    assert spec["rayVersion"] == version("ray")
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in str(head["template"])
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])


def entrypoint_spec(entrypoint: str) -> str:
    """The spec path of a RayJob entrypoint `... fasweep launch PATH ...`."""
    path = re.search(r"fasweep launch (sweeps/\S+\.yaml)", entrypoint)
    assert path, entrypoint
    return path[1]


def test_the_driver_gets_its_grace_period_when_kubernetes_or_ray_stops_it(rendered: list[dict[str, Any]]) -> None:
    """SIGTERM gives the driver GRACE_S to stop trials and mark runs: the head pod's grace period and `ray job
    stop`'s wait before SIGKILL (from the ConfigMap) are both longer."""
    from fasweep.signals import GRACE_S

    ray = next(o for o in rendered if o["kind"] in RAY_KINDS)
    cluster = ray["spec"].get("rayClusterSpec", ray["spec"])
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert GRACE_S < head["terminationGracePeriodSeconds"] <= 30 + 5
    config = find(rendered, "ConfigMap", "fasweep-config")["data"]
    assert GRACE_S < int(config["RAY_JOB_STOP_WAIT_TIME_S"]) < head["terminationGracePeriodSeconds"]


def test_rayjob_resumes_the_sweep_and_cleans_up() -> None:
    job = find(render(OVERLAYS["job"]), "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["backoffLimit"] >= 1, "a failed attempt must be retried on a fresh cluster"
    path = entrypoint_spec(job["entrypoint"])
    assert "--resume" in job["entrypoint"] and "storage=$FASWEEP_STORAGE" in job["entrypoint"]
    assert (REPO / path).exists(), f"the RayJob launches {path}, which is not in the repository"


def test_storage_and_image_configured_in_one_place() -> None:
    objects = render(OVERLAYS["job"])
    config = find(objects, "ConfigMap", "fasweep-config")
    s3_mentions = [o["metadata"]["name"] for o in objects if "s3://" in yaml.safe_dump(o)]
    assert s3_mentions == ["fasweep-config"], "bucket URIs belong in the ConfigMap only"
    assert config["data"]["FASWEEP_STORAGE"].startswith("s3://")
    assert "storage=$FASWEEP_STORAGE" in find(objects, "RayJob")["spec"]["entrypoint"]
    for where, template in pod_templates(find(objects, "RayJob")):
        for container in template["spec"]["containers"] if where != "submitter" else []:
            assert {"configMapRef": {"name": "fasweep-config"}} in container["envFrom"], where
    images = {c["image"] for c in containers_of_all(objects) if "postgres" not in c["image"]}
    assert images == {"fasweep:0.1.0"}, "one image for Ray, the submitter and MLflow, set by `images:`"


def test_rayjob_and_raycluster_pods_stay_equal() -> None:
    job, cluster = ray_cluster_spec(render(OVERLAYS["job"])), ray_cluster_spec(render(OVERLAYS["cluster"]))
    assert job == cluster


def test_mlflow_server_is_locked_down(rendered: list[dict[str, Any]]) -> None:
    """Basic auth, allowed hosts, proxied artifacts, probes, resources; credentials only from Secrets."""
    mlflow = find(rendered, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(mlflow["args"])
    for flag in ("--app-name basic-auth", "--serve-artifacts", "--allowed-hosts"):
        assert flag in script
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://$(POSTGRES_USER):")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mlflow[probe]["httpGet"]["path"] == "/health"
    secrets = {o["metadata"]["name"] for o in rendered if o["kind"] == "Secret"}
    assert {"postgres", "mlflow-auth", "mlflow-client", "s3"} <= secrets
    for obj in rendered:
        if obj["kind"] == "ConfigMap":
            assert not [k for k in obj["data"] if any(w in k for w in ("PASSWORD", "SECRET", "TOKEN"))]
        for where, template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                assert container["resources"]["requests"] and container["resources"]["limits"], where
                for var in container.get("env", []):
                    if any(w in var["name"] for w in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")):
                        assert "secretKeyRef" in var["valueFrom"], f"{obj['metadata']['name']}: {var['name']}"
                for source in container.get("envFrom", []):
                    assert set(source) <= {"configMapRef", "secretRef"}
    assert "*.env" in (DEPLOY / "base" / "secrets" / ".gitignore").read_text().split(), "real env files stay out of git"


# --- the distributed path, with real processes ------------------------------------------------------------------

EPOCHS = {"spread": 3, "kill": 12, "restart": 8}


class Stack(NamedTuple):
    database: str
    server: MlflowServer
    cluster: RayCluster


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL, `mlflow server` on it, and a Ray head + 2 worker nodes, shared by the tests below."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    work = tmp_path_factory.mktemp("stack")
    with postgres() as db, mlflow_server(db, work) as server, ray_cluster(work, workers=2) as cluster:
        yield Stack(db, server, cluster)


def write_spec(path: Path, name: str, epochs: int, storage: Path, batch_size: int = 32) -> Path:
    """A small digits sweep: 2 conditions x 2 seeds, one CPU per trial, a retry per trial."""
    spec = {
        "name": name,
        "base": {
            "data": {"name": "digits"},
            "model": {"arch": "DS0"},
            "train": {"epochs": epochs, "batch_size": batch_size, "device": "cpu"},
        },
        "conditions": {"bp": {"feedback.mode": "bp"}, "random": {"model.arch": "DSR1"}},
        "seeds": [0, 1],
        "resources": {"cpu": 1},
        "max_retries": 2,
        "storage": str(storage),
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def launch_env(cluster: RayCluster) -> dict[str, str]:
    """The driver's env: the cluster's (Ray auth token), `fasweep` on PATH as in the image, one torch thread,
    and Tune's own result.json logs back on (fasweep turns them off) so a test can see restores."""
    path = f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin"
    env = {**cluster.env, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return {**env, "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "0"}


def launch(spec: Path, cluster: RayCluster, server: MlflowServer, log: Path) -> subprocess.Popen[bytes]:
    """`fasweep launch SPEC --address ... --tracking-uri ...` as its own process (the Ray driver)."""
    cmd = [str(BIN / "fasweep"), "launch", str(spec), "--address", cluster.address, "--tracking-uri", server.url]
    return start(cmd, log, launch_env(cluster))


def finish(proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Wait for a launch to end; fail with its log tail if it failed or ran over."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"launch ran over {timeout_s}s:\n{log.read_text()[-3000:]}")
    assert rc == 0, log.read_text()[-3000:]


def trial_runs(server: MlflowServer, sweep: str) -> list[Any]:
    """Every child (trial) run of `sweep` on the server."""
    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.`fasweep.role` = 'trial'", max_results=1000)


def epochs_logged(server: MlflowServer, sweep: str) -> int:
    """Epochs logged so far, summed over the trials of `sweep`."""
    client = mlflow.MlflowClient(server.url)
    return sum(len(client.get_metric_history(r.info.run_id, "train_loss")) for r in trial_runs(server, sweep))


def both_nodes_mid_trial(server: MlflowServer, cluster: RayCluster, sweep: str, epochs: int) -> bool:
    """Both workers busy and every running trial past its first checkpoint, with epochs still to go: a node
    killed now takes a trial down mid-way (not one that has just started or is about to end)."""
    if cluster.busy_nodes() != {"w1", "w2"}:
        return False
    client = mlflow.MlflowClient(server.url)
    running = [r for r in trial_runs(server, sweep) if r.data.tags.get("fasweep.status") == "running"]
    done = [len(client.get_metric_history(r.info.run_id, "train_loss")) for r in running]
    return len(done) == 2 and all(2 <= n <= epochs - 4 for n in done)


def assert_every_trial_once_with_every_epoch(server: MlflowServer, sweep: str, epochs: int) -> list[Any]:
    runs = trial_runs(server, sweep)
    keys = sorted(r.data.tags["fasweep.trial_key"] for r in runs)
    assert keys == sorted(f"main/{c}/s{s}" for c in ("bp", "random") for s in (0, 1)), keys
    client = mlflow.MlflowClient(server.url)
    for run in runs:
        assert run.data.tags["fasweep.status"] == "finished", run.data.tags
        for metric in ("train_loss", "test_acc"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
            assert steps == list(range(1, epochs + 1)), (run.data.tags["fasweep.trial_key"], metric, steps)
    return runs


class NodeWatch:
    """Samples, in a thread, which worker nodes run trials (processes under their raylet)."""

    def __init__(self, cluster: RayCluster) -> None:
        self.cluster, self.seen, self._stop = cluster, set[str](), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= self.cluster.busy_nodes()
            self._stop.wait(0.3)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def as_rayjob_runs(entrypoint: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a RayJob entrypoint the way KubeRay and Ray do: the submitter pod's shell parses
    `ray job submit -- ENTRYPOINT` (here: printing the arguments shlex-joined, as Ray's CLI does), then the
    job's shell on the head runs the result with the head's env (RAY_ADDRESS points the driver at the cluster).
    """
    join = f"{sys.executable} -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))'"
    submitted = subprocess.run(
        ["bash", "-c", f"{join} {entrypoint}"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/bin:/usr/bin"},
    ).stdout.strip()
    return subprocess.run(["bash", "-c", submitted], capture_output=True, text=True, env=env, timeout=400)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rayjob_entrypoint_runs_a_sweep_across_nodes_once(stack: Stack, tmp_path: Path) -> None:
    """The RayJob's own entrypoint: a fresh sweep spread over both worker nodes, every trial recorded once, a
    checkpoint fetched back through the server scores the logged test accuracy; run again (a KubeRay retry)
    it resumes and adds nothing."""
    _, server, cluster = stack
    sweep = "deploy-spread"
    spec = write_spec(tmp_path / f"{sweep}.yaml", sweep, EPOCHS["spread"], tmp_path / "storage")
    entrypoint = find(render(OVERLAYS["job"]), "RayJob")["spec"]["entrypoint"]
    entrypoint = entrypoint.replace(entrypoint_spec(entrypoint), str(spec))
    env = {
        **launch_env(cluster),
        "RAY_ADDRESS": cluster.address,
        "MLFLOW_TRACKING_URI": server.url,
        "FASWEEP_STORAGE": str(tmp_path / "shared-storage"),
    }
    with NodeWatch(cluster) as watch:
        first = as_rayjob_runs(entrypoint, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "launching" in first.stdout and "resuming" not in first.stdout, first.stdout[-2000:]
    assert watch.seen == {"w1", "w2"}, f"trials ran on {watch.seen}, expected both worker nodes"
    runs = assert_every_trial_once_with_every_epoch(server, sweep, EPOCHS["spread"])
    assert list((tmp_path / "shared-storage" / sweep).iterdir()), "Tune state went to $FASWEEP_STORAGE"

    local = Path(
        mlflow.artifacts.download_artifacts(
            f"runs:/{runs[0].info.run_id}/checkpoint/checkpoint.pt",
            dst_path=str(tmp_path / "fetched"),
            tracking_uri=server.url,
        )
    )
    checkpoint = torch.load(local, map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == EPOCHS["spread"]
    config = TrialConfig.model_validate(checkpoint["config"])
    data = load_data(config.data)
    model = build_model(config.model, config.feedback, data.input_shape, data.num_outputs)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in data.batches("test", 512, shuffle=False))
    assert hits / len(data.y_test) == pytest.approx(runs[0].data.metrics["test_acc"], abs=1e-6)

    again = as_rayjob_runs(entrypoint, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to resume" in again.stdout
    assert len(trial_runs(server, sweep)) == 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_server_restart_mid_sweep_loses_no_metric(stack: Stack, tmp_path: Path) -> None:
    _, server, cluster = stack
    sweep = "deploy-restart"
    spec = write_spec(tmp_path / f"{sweep}.yaml", sweep, EPOCHS["restart"], tmp_path / "storage")
    log = tmp_path / "launch.log"
    proc = launch(spec, cluster, server, log)
    try:
        wait_for(lambda: epochs_logged(server, sweep) >= 2, 300, "first epochs on the server")
        server.stop()
        assert proc.poll() is None, "the sweep must still be training while the server is down"
        time.sleep(3.0)
        server.start()
        finish(proc, log, 400)
    finally:
        stop(proc)
    assert_every_trial_once_with_every_epoch(server, sweep, EPOCHS["restart"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_server_as_deployed_requires_login_and_known_hosts(stack: Stack, tmp_path: Path) -> None:
    """The Deployment's own start script (basic-auth app, ini written from env, --allowed-hosts), run here on
    the test's PostgreSQL: health is open, the API wants the admin login, unknown Host headers are refused."""
    container = find(render(OVERLAYS["job"]), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    ini = tmp_path / "basic_auth.ini"
    script = container["args"][0].replace("/tmp/basic_auth.ini", str(ini)).replace("0.0.0.0", "127.0.0.1")
    script = script.replace("5000", str(port)).replace("--workers 2", "--workers 1")
    env = {
        "PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "MLFLOW_BACKEND_STORE_URI": stack.database,
        "MLFLOW_ARTIFACTS_DESTINATION": (tmp_path / "artifacts").as_uri(),
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-for-test",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key",
    }
    url = f"http://127.0.0.1:{port}"
    proc = start(["bash", "-c", script], tmp_path / "server.log", env)
    try:

        def health() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "server.log").read_text()[-3000:])
            return requests.get(f"{url}/health", timeout=5).ok

        wait_for(health, 180, "mlflow server (basic auth)")
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        login = ("admin", "s3cret-for-test")
        assert requests.get(api, timeout=10).status_code == 401
        assert requests.get(api, auth=("admin", "wrong"), timeout=10).status_code == 401
        assert requests.get(api, auth=login, timeout=10).status_code == 200
        forged = requests.get(api, auth=login, headers={"Host": "evil.example"}, timeout=10)
        assert forged.status_code == 403
        assert ini.stat().st_mode & 0o777 == 0o600, "the ini holds the database password"
    finally:
        stop(proc)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_node_killed_mid_sweep_trials_resume_elsewhere(stack: Stack, tmp_path: Path) -> None:
    """Kill node w1 while it trains: its trials continue from their last checkpoint on w2 (Tune's result log
    shows a restore past epoch 1) and MLflow ends with every trial once, every epoch present. Runs last: it
    leaves one worker node."""
    _, server, cluster = stack
    sweep = "deploy-kill"
    storage = tmp_path / "storage"
    # small batches: epochs long enough (~1 s) that the kill lands mid-trial, past a checkpoint
    spec = write_spec(tmp_path / f"{sweep}.yaml", sweep, EPOCHS["kill"], storage, batch_size=4)
    log = tmp_path / "launch.log"
    proc = launch(spec, cluster, server, log)
    try:
        wait_for(lambda: both_nodes_mid_trial(server, cluster, sweep, EPOCHS["kill"]), 300, "w1 mid-trial")
        cluster.kill_worker("w1")
        finish(proc, log, 450)
    finally:
        stop(proc)
    assert_every_trial_once_with_every_epoch(server, sweep, EPOCHS["kill"])
    restored = []
    for result_log in storage.rglob("result.json"):
        rows = [json.loads(line) for line in result_log.read_text().splitlines() if line.strip()]
        epochs = [row["epoch"] for row in rows if "epoch" in row]
        assert epochs == sorted(set(epochs)), f"{result_log.parent.name} trained an epoch twice: {epochs}"
        restored += [row for row in rows if row.get("iterations_since_restore") == 1 and row.get("epoch", 1) > 1]
    assert restored, "no trial resumed from a checkpoint after the node died"
