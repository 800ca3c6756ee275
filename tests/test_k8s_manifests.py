"""deploy/k8s/: the manifests parse, their argv is what the executor accepts, and their wiring holds."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from executor.cli import parse_fast_execute
from executor.invocation import DEFAULT_RESOLVER

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
GRACE_MARGIN_SECONDS = 10  # at least this long after the task's grace, for error.pb to be written and uploaded

# CONTRACT.md §1: the flags a Flyte 1 backend writes for a fast-registered task, in this order.
FAST_EXECUTE_SHAPE = [
    "pyflyte-fast-execute", "--additional-distribution", None, "--dest-dir", None, "--",
    "pyflyte-execute", "--inputs", None, "--output-prefix", None, "--raw-output-data-prefix", None,
    "--checkpoint-path", None, "--prev-checkpoint", None, "--resolver", DEFAULT_RESOLVER,
    "--", "task-module", None, "task-name", None,
]


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _pod_specs() -> list[tuple[str, dict]]:
    """(name, pod spec) of every Pod and PodTemplate."""
    out = []
    for name, doc in _documents():
        if doc["kind"] == "Pod":
            out.append((f"{name}:Pod", doc["spec"]))
        elif doc["kind"] == "PodTemplate":
            out.append((f"{name}:PodTemplate", doc["template"]["spec"]))
    return out


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _dockerfile_default(name: str) -> str:
    text = (REPO / "Dockerfile").read_text()
    match = re.search(rf"^\s*(?:ARG|ENV)\b.*?\b{name}=(\S+)", text, re.M) or re.search(rf"\b{name}=(\S+)", text)
    assert match, f"{name} not set in the Dockerfile"
    return match.group(1).rstrip("\\").strip()


def _task_pod() -> dict:
    pods = [doc for _, doc in _documents() if doc["kind"] == "Pod"]
    assert len(pods) == 1, "deploy/k8s should hold exactly one example task pod"
    return pods[0]


def test_manifests_exist_and_parse():
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == ["Pod", "PodTemplate"]
    for _, doc in _documents():
        assert doc["apiVersion"] == "v1" and doc["metadata"]["name"]


def test_task_pod_args_are_flytes_and_parse():
    pod = _task_pod()
    (container,) = pod["spec"]["containers"]
    assert "command" not in container, "the image's ENTRYPOINT must receive the args"
    args = container["args"]
    assert all(isinstance(a, str) for a in args)
    assert len(args) == len(FAST_EXECUTE_SHAPE)
    for got, want in zip(args, FAST_EXECUTE_SHAPE):
        if want is not None:
            assert got == want

    invocation = parse_fast_execute(args[1:])
    assert invocation.bundle is not None
    assert re.fullmatch(r"s3://.+/fast[0-9a-f]{32}\.tar\.gz", invocation.bundle.uri)
    assert invocation.bundle.dest_dir == "/root"
    assert invocation.inputs_uri.endswith("/data/inputs.pb")
    assert invocation.output_prefix == invocation.inputs_uri.rsplit("/", 1)[0] + "/0"
    assert invocation.checkpoint_path == invocation.raw_output_prefix + "/_flytecheckpoints"
    assert invocation.prev_checkpoint is None  # '""' on attempt 0
    assert invocation.resolver == DEFAULT_RESOLVER
    assert invocation.resolver_args == ("task-module", "wf.tasks", "task-name", "add")
    assert _env(container)["FLYTE_ATTEMPT_NUMBER"] == "0"
    assert container["name"] == pod["metadata"]["name"] and pod["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("where, spec", _pod_specs(), ids=[name for name, _ in _pod_specs()])
def test_bundle_cache_is_a_hostpath_at_executor_cache_dir(where, spec):
    volumes = {v["name"]: v for v in spec["volumes"]}
    (container,) = spec["containers"]
    cache_dir = _env(container)["EXECUTOR_CACHE_DIR"]
    assert cache_dir == _dockerfile_default("EXECUTOR_CACHE_DIR"), "the manifest and the image disagree"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert cache_dir in mounts, f"nothing is mounted at EXECUTOR_CACHE_DIR={cache_dir}"
    volume = volumes[mounts[cache_dir]]
    assert volume["hostPath"]["path"].startswith("/") and volume["hostPath"]["type"] in ("DirectoryOrCreate", "Directory")
    # The hostPath is created root-owned; the init container hands it to the image's user.
    (init,) = spec["initContainers"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts[cache_dir] in init_mounts
    uid = int(_dockerfile_default("EXECUTOR_UID"))
    assert f"chown {uid}:{uid} {init_mounts[mounts[cache_dir]]}" in " ".join(init["command"])


@pytest.mark.parametrize("where, spec", _pod_specs(), ids=[name for name, _ in _pod_specs()])
def test_termination_grace_covers_the_executors_grace(where, spec):
    (container,) = spec["containers"]
    grace = int(_env(container)["EXECUTOR_GRACE_SECONDS"])
    assert grace > 0
    assert spec["terminationGracePeriodSeconds"] >= grace + GRACE_MARGIN_SECONDS, (
        "the kubelet would SIGKILL the pod before the executor's grace ends and error.pb is written")


@pytest.mark.parametrize("where, spec", _pod_specs(), ids=[name for name, _ in _pod_specs()])
def test_runs_as_the_images_non_root_user(where, spec):
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(_dockerfile_default("EXECUTOR_UID"))
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_task_pod_has_resource_limits():
    (container,) = _task_pod()["spec"]["containers"]
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    # The memory limit is what the executor's OOM reporting reads (cgroup memory.max).
    assert re.fullmatch(r"\d+(Mi|Gi)", resources["limits"]["memory"])


def test_task_pod_is_the_template_merged():
    """What pod-template.yaml sets must be in the example pod, unchanged."""
    template = next(doc for _, doc in _documents() if doc["kind"] == "PodTemplate")["template"]["spec"]
    pod = _task_pod()["spec"]
    (default,) = template["containers"]
    (container,) = pod["containers"]
    assert default["name"] == "default"  # Flyte applies a container named "default" to every task container
    for name, value in _env(default).items():
        assert _env(container).get(name) == value, name
    assert default["volumeMounts"] == container["volumeMounts"]
    for key in ("volumes", "initContainers", "securityContext", "terminationGracePeriodSeconds"):
        assert template[key] == pod[key], key
    image = container["image"]
    assert all(init["image"] == image for init in pod["initContainers"])
