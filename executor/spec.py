"""The runtime spec of one invocation: what the TaskTemplate (or, without one, the pod's env) asks for.

    --task-template URI       a flyteidl.core TaskTemplate .pb: container.env, metadata.timeout,
                              metadata.retries, interruptible, the CPU limit, requested secrets
    EXECUTOR_TIMEOUT_SECONDS  timeout without a template (0 or unset: none)
    EXECUTOR_RETRIES          in-place retries without a template (default 0)
    EXECUTOR_GRACE_SECONDS    time a task gets between SIGTERM and SIGKILL (default 25)
    EXECUTOR_INPLACE_RETRIES  "off" disables retrying recoverable failures in the container
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from executor.errors import TaskFailure

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")


@dataclass(frozen=True)
class SecretRequest:
    group: str
    key: str = ""
    group_version: str = ""
    mount: str = "ANY"  # ANY | ENV_VAR | FILE
    env_var: str = ""

    @property
    def label(self) -> str:
        return "/".join(p for p in (self.group, self.group_version, self.key) if p)


@dataclass(frozen=True)
class RuntimeSpec:
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float | None = None
    retries: int = 0
    interruptible: bool = False
    cpu_limit: float | None = None
    secrets: tuple[SecretRequest, ...] = ()
    grace_seconds: float = 25.0
    inplace_retries: bool = True
    task_name: str = ""


def _float_env(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise TaskFailure("TEMPLATE_INVALID", f"{name}={raw!r} is not a number") from None


def _cpu_quantity(text: str) -> float | None:
    """Kubernetes CPU quantity: '2', '1.5', '500m'."""
    text = text.strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


_cpu_limit_read: tuple[float, float | None] = (-1e9, None)  # (when, what): a warm worker asks per invocation


def _cgroup_cpu_limit() -> float | None:
    global _cpu_limit_read
    now = time.monotonic()
    if now - _cpu_limit_read[0] < 5.0:  # a pod resized in place is seen within seconds
        return _cpu_limit_read[1]
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        limit = None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        limit = None
    _cpu_limit_read = (now, limit)
    return limit


def from_template(template_bytes: bytes | None, uri: str = "", grace_flag: float | None = None) -> RuntimeSpec:
    grace = grace_flag if grace_flag is not None else _float_env("EXECUTOR_GRACE_SECONDS", 25.0)
    inplace = os.environ.get("EXECUTOR_INPLACE_RETRIES", "on").strip().lower() not in ("off", "0", "false", "no")
    if template_bytes is None:
        timeout = _float_env("EXECUTOR_TIMEOUT_SECONDS", None)
        retries = int(_float_env("EXECUTOR_RETRIES", 0) or 0)
        return RuntimeSpec(timeout_seconds=timeout or None, retries=retries, cpu_limit=_cgroup_cpu_limit(),
                           grace_seconds=grace, inplace_retries=inplace)
    from flyteidl.core import tasks_pb2

    template = tasks_pb2.TaskTemplate()
    try:
        template.ParseFromString(template_bytes)
    except Exception as e:
        raise TaskFailure("TEMPLATE_INVALID", f"{uri} is not a flyteidl.core.TaskTemplate ({type(e).__name__}: {e})") from None
    env = {}
    for pair in template.container.env:
        if "{{" in pair.value and "}}" in pair.value:
            raise TaskFailure("TEMPLATE_INVALID", f"container.env {pair.key}={pair.value!r} holds an unrendered template",
                              hint="the backend did not substitute it; check the task's environment settings")
        env[pair.key] = pair.value
    meta = template.metadata
    timeout = meta.timeout.seconds + meta.timeout.nanos / 1e9 if meta.HasField("timeout") else 0.0
    cpu = None
    for entry in template.container.resources.limits:
        if entry.name == tasks_pb2.Resources.CPU:
            cpu = _cpu_quantity(entry.value)
    mounts = {0: "ANY", 1: "ENV_VAR", 2: "FILE"}
    secrets = tuple(
        SecretRequest(s.group, s.key, s.group_version, mounts.get(s.mount_requirement, "ANY"), s.env_var)
        for s in template.security_context.secrets
    )
    return RuntimeSpec(
        env=env,
        timeout_seconds=timeout or _float_env("EXECUTOR_TIMEOUT_SECONDS", None) or None,
        retries=meta.retries.retries,
        interruptible=meta.interruptible,
        cpu_limit=cpu or _cgroup_cpu_limit(),
        secrets=secrets,
        grace_seconds=grace,
        inplace_retries=inplace,
        task_name=template.id.name,
    )


def apply_environment(spec: RuntimeSpec) -> None:
    """Task env wins over the image's; thread pools follow the CPU limit unless the user set them."""
    os.environ.update(spec.env)
    if spec.cpu_limit:
        threads = str(max(1, int(spec.cpu_limit)))
        for name in THREAD_VARS:
            os.environ.setdefault(name, threads)
