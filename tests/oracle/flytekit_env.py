"""pytest plugin: a throwaway venv with flytekit 1.16.31 (the Flyte 1 oracle).

The venv lives at ``<repo>/.cache/oracle/flytekit-1.16.31`` and is made once: flytekit and this
repo (editable, so ``python -m executor`` runs against the working tree) are installed in ONE pip
resolver pass, so our executor's dependencies and flytekit's have to agree. A marker file written
last says the venv is complete and for which pyproject.toml; anything else is wiped and rebuilt.
If pip fails the fixture fails: oracle tests never skip silently.

``tests/oracle/fk_tool.py`` runs inside the venv and does the flytekit-side work (writing inputs
with flytekit's TypeEngine, decoding outputs); :class:`FlytekitOracle` wraps it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cloudpickle
import pytest

FLYTEKIT_VERSION = "1.16.31"
REPO_ROOT = Path(__file__).resolve().parents[2]
ORACLE_ROOT = REPO_ROOT / ".cache" / "oracle"
FK_TOOL = Path(__file__).resolve().with_name("fk_tool.py")

# Python's and pip's own variables must not leak from the test run into oracle subprocesses.
_SCRUBBED_ENV = ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PIP_REQUIRE_VIRTUALENV")


def _say(msg: str) -> None:
    # Fixture output is captured by pytest; building the venv takes minutes, so talk to the terminal.
    print(f"[flytekit-oracle] {msg}", file=sys.__stderr__, flush=True)


def subprocess_env(extra: Mapping[str, str] | None = None, *, repo_importable: bool = True) -> dict[str, str]:
    """Environment for any task subprocess: the repo root importable, no venv leakage."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    if repo_importable:
        env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra:
        env.update(extra)
    return env


def _spec() -> str:
    pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
    return f"flytekit=={FLYTEKIT_VERSION}\npyproject-sha256={hashlib.sha256(pyproject).hexdigest()}\n"


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive file lock: concurrent test runs build a shared venv or image once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_venv(name: str, packages: list[str], spec: str, ready: str = "python") -> Path:
    """Create (or reuse) ORACLE_ROOT/<name> with `packages` in one pip resolver pass.

    A marker holding `spec` is written only when everything succeeded, so a half-made or stale venv
    (another SDK version, a changed pyproject) is rebuilt. Raises on any failure, never skips.
    """
    venv = ORACLE_ROOT / name
    marker = venv / ".oracle-complete"
    log = ORACLE_ROOT / f"{name}.log"
    with locked(ORACLE_ROOT / f"{name}.lock"):
        if marker.is_file() and marker.read_text() == spec and (venv / "bin" / ready).exists():
            return venv
        if venv.exists():
            _say(f"discarding incomplete or stale venv {venv}")
            shutil.rmtree(venv)
        started = time.monotonic()
        _say(f"creating venv {venv} (one-off, about 1-2 minutes; pip log: {log})")
        with open(log, "w") as out:
            steps = [
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *packages],
            ]
            for cmd in steps:
                _say("running " + " ".join(cmd))
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(repo_importable=False)).returncode
                if rc != 0:
                    tail = log.read_text()[-4000:]
                    raise RuntimeError(f"oracle venv step failed (exit {rc}): {' '.join(cmd)}\n{tail}")
        marker.write_text(spec)
        _say(f"venv ready in {time.monotonic() - started:.0f}s")
        return venv


def ensure_venv() -> Path:
    """The flytekit oracle venv: flytekit and this project (editable) in one resolver pass."""
    return build_venv(f"flytekit-{FLYTEKIT_VERSION}", [f"flytekit=={FLYTEKIT_VERSION}", "-e", str(REPO_ROOT)], _spec())


@dataclass
class ToolError(Exception):
    args_: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"fk_tool {' '.join(self.args_)} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-6000:]}"
        )


@dataclass(frozen=True)
class FlytekitOracle:
    venv: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def pyflyte_execute(self) -> str:
        return str(self.venv / "bin" / "pyflyte-execute")

    @property
    def pyflyte_map_execute(self) -> str:
        return str(self.venv / "bin" / "pyflyte-map-execute")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return subprocess_env(extra)

    def tool(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Run fk_tool.py in the oracle venv; returns stdout, raises ToolError on failure."""
        cmd = [self.python, str(FK_TOOL), *args]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=self.env(env), capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolError(list(args), proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def write_inputs(
        self,
        module: str,
        task: str,
        values: Mapping[str, Any],
        out: str | os.PathLike,
        *,
        workdir: Path,
        raw_prefix: str | None = None,
        map_bound: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Write ``values`` as an inputs.pb LiteralMap (``out``: a path or URI) using flytekit's
        TypeEngine and the task's interface (or, with ``map_bound``, the interface of
        ``map_task(task)`` with those inputs bound). Blobs (pickles, files) go under ``raw_prefix``
        (default ``workdir/input-raw``)."""
        workdir.mkdir(parents=True, exist_ok=True)
        values_file = workdir / "input-values.pkl"
        values_file.write_bytes(cloudpickle.dumps(dict(values)))
        args = [
            "write-inputs", "--module", module, "--task", task, "--values-pickle", str(values_file),
            "--out", str(out), "--raw-prefix", raw_prefix or str(workdir / "input-raw"),
        ]
        if map_bound is not None:
            args += ["--map-bound", ",".join(map_bound)]
        self.tool(*args, env=env)

    def decode_outputs(
        self,
        module: str,
        task: str,
        outputs: Sequence[str | os.PathLike],
        *,
        workdir: Path,
        env: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Decode each outputs.pb with flytekit's TypeEngine against the task's output interface.
        Files come back as ``("file", <bytes>)`` so no flytekit type crosses into the test process."""
        workdir.mkdir(parents=True, exist_ok=True)
        result = workdir / "decoded.pkl"
        args = ["decode-outputs", "--module", module, "--task", task, "--result-pickle", str(result),
                "--scratch", str(workdir / "decode-scratch")]
        for o in outputs:
            args += ["--outputs", str(o)]
        self.tool(*args, env=env)
        return cloudpickle.loads(result.read_bytes())

    def fetch(self, src: str, dst: str | os.PathLike, *, env: Mapping[str, str] | None = None) -> None:
        """Copy one object (any fsspec URI flytekit understands) to a local path."""
        self.tool("fetch", "--src", src, "--dst", str(dst), env=env)


@pytest.fixture(scope="session")
def flytekit_oracle() -> FlytekitOracle:
    try:
        venv = ensure_venv()
    except Exception as e:  # never skip: a broken oracle is a failed test
        pytest.fail(f"could not build the flytekit {FLYTEKIT_VERSION} oracle venv: {e}", pytrace=False)
    return FlytekitOracle(venv)
