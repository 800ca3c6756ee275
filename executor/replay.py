"""`executor replay`: rerun a pod's exact invocation locally, into a fresh output directory.

    executor replay [PREFIX] --argv-file F [--inputs URI] [--bundle URI] [options]
    executor replay [PREFIX] --task MODULE.TASK [--inputs URI] [--bundle URI] [options]

The invocation comes from the pod's argv (F: one argument per line, a JSON list as printed by
`kubectl get pod P -o jsonpath='{.spec.containers[0].args}'`, or a TaskTemplate/TaskSpec .pb whose
`container.args` are used and which becomes the invocation's --task-template: env, timeout,
retries, secrets). It is parsed by the same front-ends and run by the same supervisor as in a pod.
Flyte's placeholders (`{{.input}}`, `{{.outputPrefix}}`, ...) are filled in from PREFIX and
--inputs. The bundle, inputs, template and previous checkpoint are read from where the pod read
them; everything the replay writes (outputs, error document, offloaded data, checkpoints, the
bundle's dest-dir links) goes under --out, never under the original prefix. Prints the decoded
outputs, or the error message; exit 0 on success, 1 when the task failed, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import uuid

from executor import storage
from executor.cli import UsageError, parse_fast_execute, parse_flyte1
from executor.invocation import DEFAULT_RESOLVER, Invocation

_COMMANDS = ("pyflyte-fast-execute", "pyflyte-execute", "pyflyte-map-execute")
_PLACEHOLDER = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")


def read_argv_file(path: str) -> tuple[list[str], bytes | None]:
    """The pod's argv from a file, and the serialized TaskTemplate when the file is one (else None)."""
    data = storage.read_bytes(path)
    if path.lower().endswith(".pb"):
        from executor.inspect import _guess_type

        if _guess_type(path) == "task-spec":
            from flyteidl.admin.task_pb2 import TaskSpec

            spec = TaskSpec()
            spec.ParseFromString(data)
            template = spec.template
        else:
            from flyteidl.core.tasks_pb2 import TaskTemplate

            template = TaskTemplate()
            template.ParseFromString(data)
        if not template.container.args:
            raise UsageError(f"executor replay: {path} has no container.args (is it a TaskTemplate of a container task?)")
        return list(template.container.args), template.SerializeToString()
    text = data.decode("utf-8").strip()
    if text.startswith("["):
        try:
            argv = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"executor replay: {path} is not a JSON list of strings ({e})") from None
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise UsageError(f"executor replay: {path} is not a JSON list of strings")
        return argv, None
    return [line for line in text.splitlines() if line.strip()], None


def _strip_launcher(argv: list[str]) -> list[str]:
    """Drop what precedes the command word: `executor`, `/entrypoint.sh`, a command: [...] prefix."""
    for i, arg in enumerate(argv):
        if arg in _COMMANDS:
            return argv[i:]
        if arg == "a0":
            raise UsageError("executor replay: Flyte 2 (a0) invocations cannot be replayed yet")
    raise UsageError(f"executor replay: the argv has no {'/'.join(_COMMANDS)} command: {argv[:4]}")


def render(argv: list[str], values: dict[str, str]) -> list[str]:
    """Fill Flyte's {{.name}} placeholders (case-insensitive, as propeller does) that we have values for."""
    lowered = {k.lower(): v for k, v in values.items()}

    def one(match: re.Match) -> str:
        return lowered.get(match.group(1).lower(), match.group(0))

    return [_PLACEHOLDER.sub(one, arg) for arg in argv]


def _with_option(argv: list[str], flag: str, value: str) -> list[str]:
    """argv (starting at its command word) with `flag value` set among the command's own options."""
    options_end = argv.index("--") if "--" in argv else len(argv)
    if flag in argv[:options_end]:
        i = argv.index(flag)
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [argv[0], flag, value, *argv[1:]]


def invocation_from_argv(argv: list[str]) -> Invocation:
    argv = _strip_launcher(argv)
    if argv[0] == "pyflyte-fast-execute":
        return parse_fast_execute(argv[1:])
    return parse_flyte1(argv[0], argv[1:])


def _task_argv(task: str, bundle: str | None) -> list[str]:
    module, sep, name = task.partition(":") if ":" in task else task.rpartition(".")
    if not module or not name:
        raise UsageError(f"executor replay: --task {task!r} is not MODULE.TASK or MODULE:TASK")
    inner = ["pyflyte-execute", "--inputs", "{{.input}}", "--output-prefix", "{{.outputPrefix}}",
             "--raw-output-data-prefix", "{{.rawOutputDataPrefix}}", "--resolver", DEFAULT_RESOLVER,
             "--", "task-module", module, "task-name", name]
    if bundle:
        return ["pyflyte-fast-execute", "--additional-distribution", bundle, "--", *inner]
    return inner


def _default_inputs(prefix: str) -> str | None:
    """Flyte 1 keeps a node's inputs.pb beside its attempt prefixes: .../data/inputs.pb, .../data/<attempt>."""
    candidates = [storage.join(prefix, "inputs.pb")]
    parent = prefix.rstrip("/").rpartition("/")[0]
    if parent and not parent.endswith(":/"):
        candidates.append(storage.join(parent, "inputs.pb"))
    for uri in candidates:
        try:
            if storage.exists(uri):
                return uri
        except storage.StorageError:
            pass
    return None


def _same_place(a: str, b: str) -> bool:
    def norm(uri: str) -> str:
        path = storage._local_path(uri)
        return os.path.realpath(path) if path is not None else uri.rstrip("/")

    return norm(a) == norm(b) or norm(a).startswith(norm(b).rstrip("/") + "/")


def _fresh_out_dir(out: str | None) -> str:
    if out is None:
        out = os.path.abspath(f"replay-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"executor replay: --out {out} is not empty; give a new directory")
    return out


def _secrets_env(secrets_dir: str) -> dict[str, str]:
    """Files DIR/<group>/<key> → FLYTE_SECRETS_DEFAULT_DIR=DIR and _FSEC_<GROUP>_<KEY>=<value>.

    Both places flytekit's secrets manager looks. For now the secrets are passed through as the
    environment only; checking that every secret the task requests is present comes with the
    secrets work (see docs/debugging.md).
    """
    from executor import logs

    if not os.path.isdir(secrets_dir):
        raise UsageError(f"executor replay: --secrets-dir {secrets_dir} is not a directory")
    secrets_dir = os.path.abspath(secrets_dir)
    env = {"FLYTE_SECRETS_DEFAULT_DIR": secrets_dir}
    for group in sorted(os.listdir(secrets_dir)):
        group_dir = os.path.join(secrets_dir, group)
        if not os.path.isdir(group_dir) or group.startswith("."):
            continue
        for key in sorted(os.listdir(group_dir)):
            path = os.path.join(group_dir, key)
            if os.path.isfile(path) and not key.startswith("."):
                with open(path, encoding="utf-8", errors="replace") as f:
                    value = f.read().strip()
                logs.add_redaction(value)
                env[f"_FSEC_{group.upper()}_{key.upper()}"] = value
    return env


def _build_parser() -> argparse.ArgumentParser:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"{self.prog}: {message}")

    p = _Parser(prog="executor replay", description=__doc__.split("\n\n")[0].strip(),
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("prefix", nargs="?", help="the original --output-prefix (fills {{.outputPrefix}}; "
                   "its inputs.pb or ../inputs.pb is the default --inputs). Only read, never written")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--argv-file", metavar="F", help="the pod's argv: one per line, a JSON list, or a TaskTemplate .pb")
    source.add_argument("--task", metavar="MODULE.TASK", help="run this task with the default resolver")
    p.add_argument("--inputs", metavar="URI", help="inputs.pb to use (overrides the argv's --inputs)")
    p.add_argument("--bundle", metavar="URI", help="code bundle to use (overrides the argv's --additional-distribution)")
    p.add_argument("--out", metavar="DIR", help="fresh local directory for everything written (default ./replay-<time>-<id>)")
    p.add_argument("--task-template", metavar="URI", help="TaskTemplate .pb for the invocation (env, timeout, retries, "
                   "secrets); implied when --argv-file is one")
    p.add_argument("--secrets-dir", metavar="DIR", help="DIR/<group>/<key> files: the secrets the template requests are "
                   "served from here, and every file is also passed as _FSEC_<GROUP>_<KEY> / FLYTE_SECRETS_DEFAULT_DIR")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment (repeatable)")
    p.add_argument("--array-index", type=int, metavar="N", help="map tasks: the element to run")
    return p


def main(argv: list[str]) -> int:
    ns = _build_parser().parse_args(argv)
    if not ns.argv_file and not ns.task:
        raise UsageError("executor replay: give --argv-file F (the pod's argv) or --task MODULE.TASK; "
                         "the output prefix alone does not record which task ran")
    out = _fresh_out_dir(ns.out)
    if ns.prefix and _same_place(out, ns.prefix):
        raise UsageError(f"executor replay: --out {out} is inside the original prefix {ns.prefix}; never write there")
    env: dict[str, str] = {}
    template_bytes = None
    if ns.argv_file:
        pod_argv, template_bytes = read_argv_file(ns.argv_file)
    else:
        pod_argv = _task_argv(ns.task, ns.bundle)
    inputs = ns.inputs or (_default_inputs(ns.prefix) if ns.prefix else None)
    values = {
        "outputPrefix": ns.prefix or storage.join(out, "outputs"),
        "rawOutputDataPrefix": storage.join(out, "raw"),
        "checkpointOutputPrefix": storage.join(out, "checkpoint"),
        "prevCheckpointPrefix": '""',
    }
    if inputs:
        values["input"] = inputs
        values["inputPrefix"] = inputs.rpartition("/")[0]
    recorded = _strip_launcher(render(pod_argv, values))
    template_path = ns.task_template or (os.path.join(out, "task_template.pb") if template_bytes else None)
    if template_path:  # ours, not flytekit's: the executor applies its env, timeout, retries and secrets
        recorded = _with_option(recorded, "--task-template", template_path)
    invocation = invocation_from_argv(recorded)
    if ns.inputs:
        invocation = dataclasses.replace(invocation, inputs_uri=ns.inputs)
    # Without PREFIX an unrendered {{.outputPrefix}} was filled with our own directory: no original then.
    original_prefix = None if invocation.output_prefix == values["outputPrefix"] and not ns.prefix else invocation.output_prefix
    if original_prefix and _same_place(out, original_prefix):
        raise UsageError(f"executor replay: --out {out} is inside the original prefix {original_prefix}; never write there")

    # Everything written goes under `out`; everything read stays where the pod read it.
    dest = os.path.join(out, "dest")
    bundle = invocation.bundle
    if bundle is not None:
        bundle = dataclasses.replace(bundle, uri=ns.bundle or bundle.uri, dest_dir=dest)
    elif ns.bundle:
        from executor.invocation import BundleSpec

        bundle = BundleSpec(uri=ns.bundle, dest_dir=dest)
    replay = dataclasses.replace(
        invocation,
        output_prefix=storage.join(out, "outputs"),
        raw_output_prefix=storage.join(out, "raw"),
        checkpoint_path=storage.join(out, "checkpoint") if invocation.checkpoint_path else None,
        dynamic_addl_distro=bundle.uri if bundle else invocation.dynamic_addl_distro,
        dynamic_dest_dir=dest if bundle else invocation.dynamic_dest_dir,
        bundle=bundle,
        secrets_dir=os.path.abspath(ns.secrets_dir) if ns.secrets_dir else invocation.secrets_dir,
    )

    for pair in ns.env:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"executor replay: --env {pair!r} is not NAME=VALUE")
        env[name] = value
    if ns.array_index is not None:
        env.setdefault("BATCH_JOB_ARRAY_INDEX_VAR_NAME", "FLYTE_K8S_ARRAY_INDEX")
        env[env["BATCH_JOB_ARRAY_INDEX_VAR_NAME"]] = str(ns.array_index)
    if ns.secrets_dir:
        env.update(_secrets_env(ns.secrets_dir))
    os.environ.update(env)

    os.makedirs(out, exist_ok=True)
    if template_bytes and not ns.task_template:
        with open(os.path.join(out, "task_template.pb"), "wb") as f:
            f.write(template_bytes)
    with open(os.path.join(out, "argv.json"), "w") as f:  # replayable again: --argv-file out/argv.json
        json.dump(recorded, f, indent=1)
    _say(f"replaying {' '.join(invocation.resolver_args)}: inputs {replay.inputs_uri}"
         + (f", bundle {bundle.uri}" if bundle else "") + f"; writing to {out}")
    if original_prefix:
        _mention_original(original_prefix)

    from executor.inspect import describe_file
    from executor.supervisor import supervise  # exactly what a pod's argv runs through

    result = supervise(replay)
    if result.outcome == "success":
        outputs = storage.read_bytes(storage.join(replay.output_prefix, "outputs.pb"))
        print(json.dumps(describe_file(outputs, "literal-map")["values"], indent=2, default=str))
        return 0
    if result.outcome in ("ignored", "test"):
        _say(f"the task finished without outputs ({result.outcome})")
        return 0
    for uri in result.written:
        try:
            print(describe_file(storage.read_bytes(uri), "error")["message_text"])
        except Exception:
            print(f"the task failed ({result.failure_code}); the error document is {uri}")
    return 1


def _say(text: str) -> None:
    sys.stderr.write(f"executor replay: {text}\n")


def _mention_original(prefix: str) -> None:
    """Say how the original attempt ended, when its prefix is readable (best effort, read only)."""
    try:
        data = storage.read_bytes(storage.join(prefix, "error.pb"))
    except Exception:
        return
    try:
        from executor.inspect import describe_file

        error = describe_file(data, "error")["proto"].get("error", {})
        _say(f"the original attempt at {prefix} failed with {error.get('code', '?')}")
    except Exception:
        pass
