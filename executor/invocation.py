"""The one internal model: what to run (Invocation) and what came of it (Result).

Every front-end (pyflyte-execute, pyflyte-map-execute, later a0, run, serve) builds an Invocation;
nothing downstream looks at argv again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"
MAP_RESOLVER = "flytekit.core.array_node_map_task.ArrayNodeMapTaskResolver"
FLYTE2_RESOLVER = "flyte._internal.resolvers.default.DefaultTaskResolver"


@dataclass(frozen=True)
class MapSpec:
    """An ArrayNode map task: run element `index` of every input not in `bound_inputs`."""

    index: int
    bound_inputs: frozenset[str]
    max_concurrency: int | None = None


@dataclass(frozen=True)
class BundleSpec:
    """A fast-registration code bundle to fetch, verify and put on sys.path before loading the task."""

    uri: str
    dest_dir: str | None = None
    archive_md5: str | None = None


@dataclass(frozen=True)
class Flyte2Spec:
    """What only a Flyte 2 (`a0`) invocation carries: the action's identity and its pickled-task bundle."""

    version: str
    run_base_dir: str
    run_name: str
    action_name: str
    project: str
    domain: str
    org: str
    run_start_time: str | None = None  # RFC 3339 as given; None: unset or an unrendered template
    image_cache: str | None = None
    pkl_uri: str | None = None  # --pkl: gzip(cloudpickle(task)); no resolver then
    dest_dir: str | None = None
    interactive: bool = False


@dataclass(frozen=True)
class Invocation:
    inputs_uri: str
    output_prefix: str
    resolver: str
    resolver_args: tuple[str, ...]
    raw_output_prefix: str | None = None
    checkpoint_path: str | None = None
    prev_checkpoint: str | None = None
    dynamic_addl_distro: str | None = None
    dynamic_dest_dir: str | None = None
    is_map_task: bool = False
    max_concurrency: int | None = None
    test: bool = False
    protocol: str = "flyte1"
    bundle: BundleSpec | None = None
    task_template: str | None = None  # URI of a TaskTemplate .pb: env, timeout, retries, secrets
    secrets_dir: str | None = None  # local secrets for debugging: DIR/group/key
    grace_seconds: float | None = None  # SIGTERM -> SIGKILL grace (else EXECUTOR_GRACE_SECONDS)
    flyte2: Flyte2Spec | None = None  # set exactly when protocol == "flyte2"

    @property
    def raw_output_prefix_or_default(self) -> str:
        # Without a rendered raw-output prefix, keep offloaded data next to the outputs rather than
        # in a local temp dir that dies with the pod.
        if self.raw_output_prefix:
            return self.raw_output_prefix
        return self.output_prefix.rstrip("/") + "/raw"


@dataclass
class Result:
    outcome: str  # "success" | "failure" | "ignored" | "test"
    exit_code: int
    written: list[str] = field(default_factory=list)
    failure_code: str | None = None
