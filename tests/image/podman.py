"""Build and run the executor image with podman, the way DESIGN.md's test rig describes.

No Docker engine and no registry here: the base image is a Debian rootfs made by debootstrap and
imported into podman, the project and its dependencies go into the image as wheels built on the
host, and containers run with runc and explicit ulimits (crun fails on this kernel's cgroups).

Everything podman stores lives under <repo>/.cache/image/ (its own --root), keyed so that reruns
are fast: the base by its recipe, the image by a hash of everything that goes into it. What is
missing is made once, under a file lock, and announced on the terminal.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.oracle.flytekit_env import locked

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "image"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3,python3-venv,ca-certificates,tini"
BASE_RECIPE = f"debootstrap --variant=minbase --include={BASE_PACKAGES} {SUITE} {MIRROR}"
BASE_TAG = "localhost/executor-test-base:" + hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:12]
IMAGE_REPO = "localhost/executor-test"

# What goes into the image (and into its cache key). The build context is a copy of these.
CONTEXT_FILES = ("Dockerfile", "entrypoint.sh", ".dockerignore", "pyproject.toml", "README.md")
CONTEXT_DIRS = ("executor",)

RUN_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network=host")
APT_PACKAGES = ("podman", "runc", "debootstrap")


class Unavailable(Exception):
    """podman genuinely cannot run here: the reason to skip, said out loud."""


def say(msg: str) -> None:
    print(f"[image] {msg}", file=sys.__stderr__, flush=True)


def _run(cmd, *, timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                           f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def ensure_tools() -> None:
    """podman, runc and debootstrap on PATH, installed with apt-get if missing and possible."""
    missing = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"{', '.join(missing)} not installed, and apt-get cannot install them here "
                          f"(root: {os.geteuid() == 0}, apt-get: {bool(shutil.which('apt-get'))})")
    say(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    still = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if still:
        raise Unavailable(f"{', '.join(still)} still missing after apt-get install")


@dataclass
class Podman:
    """podman with its own storage under .cache/image (reruns find their base and image there)."""

    root: Path = CACHE / "containers"

    @property
    def global_flags(self) -> list[str]:
        state = Path("/tmp") / f"executor-test-podman-{hashlib.sha256(str(self.root).encode()).hexdigest()[:8]}"
        return ["--root", str(self.root), "--runroot", str(state / "run"), "--tmpdir", str(state / "libpod")]

    def __call__(self, *args, timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return _run(["podman", *self.global_flags, *args], timeout=timeout, check=check, **kw)

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False, timeout=60).returncode == 0

    def run(self, image: str, *args: str, env: dict | None = None, volumes: dict | None = None,
            extra: tuple[str, ...] = (), timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess:
        flags = ["run", "--rm", *RUN_FLAGS, *extra]
        for name, value in (env or {}).items():
            flags += ["-e", f"{name}={value}"]
        for host, inside in (volumes or {}).items():
            flags += ["-v", f"{host}:{inside}"]
        return self(*flags, image, *args, timeout=timeout, check=check)


def probe_runtime(podman: Podman) -> None:
    """Run /bin/true in a container made of the host's own /bin/true: no image, no network needed."""
    rootfs = CACHE / "probe-rootfs"
    if not (rootfs / "bin" / "true").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy2("/bin/true", rootfs / "bin" / "true")
        libs = _run(["ldd", "/bin/true"], timeout=30).stdout
        for token in libs.split():
            if token.startswith("/") and os.path.exists(token):
                target = rootfs / token.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(token), target)
    proc = podman("run", "--rm", *RUN_FLAGS, "--rootfs", str(rootfs), "/bin/true", check=False, timeout=120)
    if proc.returncode != 0:
        raise Unavailable(f"podman cannot run a container here (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")


def ensure_base(podman: Podman) -> str:
    """The debootstrap base image, made once (about 45 s) and kept in podman's store."""
    if podman.exists(BASE_TAG):
        return BASE_TAG
    rootfs = CACHE / "rootfs.tmp"
    shutil.rmtree(rootfs, ignore_errors=True)
    started = time.monotonic()
    say(f"making the base image {BASE_TAG}: {BASE_RECIPE} (one-off, about a minute)")
    cmd = ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs), MIRROR]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        log = (rootfs / "debootstrap" / "debootstrap.log")
        detail = log.read_text()[-3000:] if log.exists() else proc.stderr[-3000:]
        shutil.rmtree(rootfs, ignore_errors=True)
        raise RuntimeError(f"debootstrap failed (exit {proc.returncode}); is {MIRROR} reachable?\n{detail}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", *podman.global_flags, "import", "-", BASE_TAG], stdin=tar.stdout,
                              capture_output=True, text=True, timeout=600)
    tar.stdout.close()
    tar.wait(timeout=60)
    shutil.rmtree(rootfs, ignore_errors=True)
    if imported.returncode != 0 or tar.returncode != 0:
        raise RuntimeError(f"podman import of the base failed: {imported.stderr[-3000:]}")
    say(f"base image ready in {time.monotonic() - started:.0f}s")
    return BASE_TAG


def _copy_context(dest: Path) -> str:
    """Copy what the image is built from into dest; return the hash of exactly those bytes."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    digest = hashlib.sha256()
    for name in CONTEXT_FILES:
        shutil.copy2(REPO / name, dest / name)
    for directory in CONTEXT_DIRS:
        shutil.copytree(REPO / directory, dest / directory, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _image_python(podman: Podman, base: str) -> str:
    out = podman.run(base, "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])", check=True, timeout=120)
    return out.stdout.strip()


def _host_python(version: str) -> str:
    """A host interpreter of the image's Python version, with pip, to build the wheels."""
    candidates = [sys.executable, shutil.which(f"python{version}"), "/usr/bin/python3"]
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return python
    raise RuntimeError(f"no host Python {version} with pip to build wheels for the image (tried {candidates})")


def _dependency_wheels(python: str, version: str, context: Path) -> Path:
    """Wheels of every dependency of '.[all]', built on the host once per pyproject.toml and Python."""
    key = hashlib.sha256((context / "pyproject.toml").read_bytes() + version.encode()).hexdigest()[:12]
    deps = CACHE / f"wheels-{key}"
    if (deps / ".complete").exists():
        return deps
    for old in CACHE.glob("wheels-*"):
        shutil.rmtree(old, ignore_errors=True)
    say(f"building dependency wheels on the host with {python} (pip wheel '.[all]')")
    scratch = Path(f"{deps}.tmp")
    _run([python, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", f"{context}[all]", "-w", scratch],
         timeout=900, cwd=context)
    for own in scratch.glob("executor-*.whl"):
        own.unlink()
    scratch.rename(deps)
    (deps / ".complete").write_text(f"python {version}\n")
    return deps


def ensure_image(podman: Podman) -> str:
    """The executor image for the working tree, built unless an identical one is already stored."""
    with locked(CACHE / "build.lock"):
        base = ensure_base(podman)
        base_id = podman("image", "inspect", "--format", "{{.Id}}", base, timeout=60).stdout.strip()
        context = CACHE / "context"
        source_hash = _copy_context(context)
        key = hashlib.sha256(f"{source_hash}\n{base_id}\n".encode()).hexdigest()[:16]
        tag = f"{IMAGE_REPO}:{key}"
        if podman.exists(tag):
            say(f"reusing {tag} (same Dockerfile, entrypoint, pyproject and source)")
            return tag
        started = time.monotonic()
        version = _image_python(podman, base)
        python = _host_python(version)
        wheels = context / "wheels"
        deps = _dependency_wheels(python, version, context)
        wheels.mkdir()
        for wheel in deps.glob("*.whl"):
            os.link(wheel, wheels / wheel.name)
        _run([python, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps", str(context),
              "-w", wheels], timeout=600, cwd=context)
        say(f"building {tag} FROM {base}")
        build = podman("build", *RUN_FLAGS, "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(context),
                       timeout=900, check=False)
        (CACHE / "build.log").write_text(build.stdout + build.stderr)
        if build.returncode != 0:
            raise RuntimeError(f"podman build failed (exit {build.returncode}); log: {CACHE / 'build.log'}\n"
                               f"{(build.stdout + build.stderr)[-5000:]}")
        say(f"image ready in {time.monotonic() - started:.0f}s")
        _forget_old_images(podman, keep=tag)
        return tag


def _forget_old_images(podman: Podman, keep: str) -> None:
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPO, timeout=60, check=False).stdout.split()
    old = [ref for ref in listed if ref != keep and ref.startswith(IMAGE_REPO + ":")]
    if old:
        podman("rmi", *old, timeout=120, check=False)
    podman("image", "prune", "-f", timeout=120, check=False)  # this store only holds our images
