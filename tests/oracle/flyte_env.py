"""pytest plugin: a throwaway venv with flyte 2.12.1 (the Flyte 2 oracle).

The venv lives at ``<repo>/.cache/oracle/flyte-2.12.1`` and is made once: flyte and this repo
(editable with its s3 extra, so ``python -m executor`` runs against the working tree and reaches
S3 as an image built with ``executor[s3]`` would) are installed in ONE pip
resolver pass, so our executor's dependencies and flyte's have to agree. A marker file written last
says the venv is complete and for which pyproject.toml; anything else is wiped and rebuilt. If pip
fails the fixture fails: oracle tests never skip silently.

``tests/oracle/f2_tool.py`` runs inside the venv and does the flyte-side work (inputs with flyte's
type engine, decoding outputs, flyte's own bundler, the task's own container args);
:class:`FlyteOracle` wraps it. ``FlyteOracle.a0`` is flyte's real ``a0`` console script.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cloudpickle
import pytest

from tests.oracle.flytekit_env import REPO_ROOT, ToolError, build_venv, subprocess_env

FLYTE_VERSION = "2.12.1"
F2_TOOL = Path(__file__).resolve().with_name("f2_tool.py")


def _say(msg: str) -> None:
    print(f"[flyte-oracle] {msg}", file=sys.__stderr__, flush=True)


def _spec() -> str:
    pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
    return f"flyte=={FLYTE_VERSION}\nexecutor[s3]\npyproject-sha256={hashlib.sha256(pyproject).hexdigest()}\n"


def ensure_venv() -> Path:
    """The flyte oracle venv: flyte and this project (editable, with s3fs) in one resolver pass."""
    return build_venv(f"flyte-{FLYTE_VERSION}", [f"flyte=={FLYTE_VERSION}", "-e", f"{REPO_ROOT}[s3]"], _spec(), ready="a0")


@dataclass(frozen=True)
class FlyteOracle:
    venv: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def a0(self) -> str:
        return str(self.venv / "bin" / "a0")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return subprocess_env(extra)

    def tool(self, *args: str, env: Mapping[str, str] | None = None) -> Any:
        """Run f2_tool.py in the oracle venv; returns its JSON answer (the last stdout line)."""
        proc = subprocess.run([self.python, str(F2_TOOL), *args], cwd=REPO_ROOT, env=self.env(env),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolError(list(args), proc.returncode, proc.stdout, proc.stderr)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def write_inputs(self, module: str, task: str, values: Mapping[str, Any], out: str | os.PathLike, *,
                     workdir: Path, context: Mapping[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        values_file = workdir / "input-values.pkl"
        values_file.write_bytes(cloudpickle.dumps(dict(values)))
        args = ["write-inputs", "--module", module, "--task", task, "--values-pickle", str(values_file), "--out", str(out)]
        for k, v in (context or {}).items():
            args += ["--context", f"{k}={v}"]
        self.tool(*args)

    def decode_outputs(self, module: str, task: str, outputs: Sequence[str | os.PathLike], *,
                       workdir: Path) -> list[dict[str, Any]]:
        workdir.mkdir(parents=True, exist_ok=True)
        result = workdir / "decoded.pkl"
        args = ["decode-outputs", "--module", module, "--task", task, "--result-pickle", str(result)]
        for o in outputs:
            args += ["--outputs", str(o)]
        self.tool(*args)
        return cloudpickle.loads(result.read_bytes())

    def container_args(self, module: str, task: str, *, version: str = "", tgz: str | None = None,
                       pkl: str | None = None) -> list[str]:
        args = ["argv", "--module", module, "--task", task, "--root", str(REPO_ROOT), "--version", version]
        if tgz:
            args += ["--tgz", tgz]
        if pkl:
            args += ["--pkl", pkl]
        return self.tool(*args)


@pytest.fixture(scope="session")
def flyte_oracle() -> FlyteOracle:
    try:
        venv = ensure_venv()
    except Exception as e:  # never skip: a broken oracle is a failed test
        pytest.fail(f"could not build the flyte {FLYTE_VERSION} oracle venv: {e}", pytrace=False)
    return FlyteOracle(venv)
