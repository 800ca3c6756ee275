"""Running the executor as a real subprocess, and reading what it wrote."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flyteidl.core import errors_pb2, literals_pb2

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"
MAP_RESOLVER = "flytekit.core.array_node_map_task.ArrayNodeMapTaskResolver"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    prefix: Path

    def outputs(self) -> literals_pb2.LiteralMap:
        m = literals_pb2.LiteralMap()
        m.ParseFromString((self.prefix / "outputs.pb").read_bytes())
        return m

    def error(self, name: str = "error.pb") -> errors_pb2.ContainerError:
        doc = errors_pb2.ErrorDocument()
        doc.ParseFromString((self.prefix / name).read_bytes())
        return doc.error

    def files(self) -> list[str]:
        return sorted(p.name for p in self.prefix.iterdir()) if self.prefix.exists() else []


def env_with(extra: dict | None = None, python: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYTE_", "_F_", "BATCH_JOB", "LOG_FORMAT"))}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_executor(args: list[str], *, env: dict | None = None, cwd: Path | None = None, python: str | None = None,
                 prefix: Path | None = None, timeout: float = 120) -> Run:
    proc = subprocess.run(
        [python or sys.executable, "-m", "executor", *args],
        env=env_with(env),
        cwd=str(cwd or REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, prefix or Path("/nonexistent"))


def pyflyte_execute_args(inputs: Path | str, prefix: Path | str, module: str, task: str, *, raw: Path | str | None = None,
                         extra: list[str] | None = None) -> list[str]:
    return [
        "pyflyte-execute",
        "--inputs", str(inputs),
        "--output-prefix", str(prefix),
        "--raw-output-data-prefix", str(raw or f"{prefix}/raw"),
        "--checkpoint-path", f"{prefix}/_flytecheckpoints",
        "--prev-checkpoint", '""',
        *(extra or []),
        "--resolver", DEFAULT_RESOLVER,
        "--", "task-module", module, "task-name", task,
    ]


def write_inputs(path: Path, values: dict, annotations: dict) -> Path:
    from executor.literals import Context, to_literal

    m = literals_pb2.LiteralMap()
    for name, value in values.items():
        m.literals[name].CopyFrom(to_literal(value, annotations[name], Context(str(path.parent / "raw"))))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path
