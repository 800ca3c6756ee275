"""Secrets: found where Flyte's webhook puts them, handed to the task the way it asked, never printed.

Lookup for Secret(group, key, group_version), in order:
  1. env  FLYTE_SECRETS_ENV_PREFIX (default _FSEC_) + GROUP[_VERSION]_KEY, upper-case
  2. env  Flyte 2's name: UPPER(group_key) with '-' -> '_' (or the secret's own env_var)
  3. file FLYTE_SECRETS_DEFAULT_DIR (default /etc/flyte/secrets)/group[/version]/FLYTE_SECRETS_FILE_PREFIX+key, lower-case
  4. file --secrets-dir DIR/group[/version]/key  (local debugging)
A missing secret stops the run before user code with SECRET_MISSING naming group and key.
"""
from __future__ import annotations

import os
import tempfile

from executor import logs
from executor.errors import TaskFailure
from executor.spec import SecretRequest


def env_name(secret: SecretRequest) -> str:
    prefix = os.environ.get("FLYTE_SECRETS_ENV_PREFIX", "_FSEC_")
    return prefix + "_".join(p.upper() for p in (secret.group, secret.group_version, secret.key) if p)


def _flyte2_env_name(secret: SecretRequest) -> str:
    return "_".join(p for p in (secret.group, secret.key) if p).upper().replace("-", "_")


def _file_candidates(secret: SecretRequest, secrets_dir: str | None) -> list[str]:
    parts = [p.lower() for p in (secret.group, secret.group_version, secret.key) if p]
    default_dir = os.environ.get("FLYTE_SECRETS_DEFAULT_DIR", os.path.join(os.sep, "etc", "flyte", "secrets"))
    webhook = os.path.join(default_dir, *parts[:-1], os.environ.get("FLYTE_SECRETS_FILE_PREFIX", "") + parts[-1])
    candidates = [webhook]
    if secrets_dir:
        candidates.append(os.path.join(secrets_dir, *[p for p in (secret.group, secret.group_version, secret.key) if p]))
    return candidates


def find(secret: SecretRequest, secrets_dir: str | None) -> tuple[str, str] | None:
    """(value, where it was found) or None."""
    for name in (env_name(secret), secret.env_var or _flyte2_env_name(secret)):
        if name and name in os.environ:
            return os.environ[name], f"env {name}"
    for path in _file_candidates(secret, secrets_dir):
        if os.path.isfile(path):
            with open(path, "r", errors="replace") as f:
                return f.read().strip(), f"file {path}"
    return None


def provide(secrets: tuple[SecretRequest, ...], secrets_dir: str | None) -> None:
    """Resolve every requested secret, register its value for redaction, and deliver it as asked."""
    missing = []
    values: dict[SecretRequest, tuple[str, str]] = {}
    for secret in secrets:
        found = find(secret, secrets_dir)
        if found is None:
            missing.append(secret)
            continue
        values[secret] = found
        logs.add_redaction(found[0])
    if missing:
        names = ", ".join(f"group={s.group!r} key={s.key!r}" for s in missing)
        raise TaskFailure(
            "SECRET_MISSING",
            f"{len(missing)} requested secret(s) not found: {names}",
            hint=f"looked in env {', '.join(env_name(s) for s in missing)} and under "
                 f"{os.environ.get('FLYTE_SECRETS_DEFAULT_DIR', '/etc/flyte/secrets')}; is the secret created in the "
                 "cluster and the webhook enabled? locally, pass --secrets-dir DIR with DIR/group/key files",
        )
    for secret, (value, where) in values.items():
        # flytekit's SecretsManager reads the _FSEC_ variable first: that serves ANY and ENV_VAR.
        os.environ.setdefault(env_name(secret), value)
        if secret.env_var:
            os.environ[secret.env_var] = value
        logs.debug("secret provided", secret=secret.label, source=where.split(" ")[0])
    file_secrets = [s for s in values if s.mount == "FILE"]
    webhook_dir = os.environ.get("FLYTE_SECRETS_DEFAULT_DIR", os.path.join(os.sep, "etc", "flyte", "secrets"))
    if any(not values[s][1].startswith(f"file {webhook_dir}") for s in file_secrets):
        # Some file the task asked for is not where the webhook puts files: serve them all from a private dir.
        root = tempfile.mkdtemp(prefix="executor-secrets-")
        for secret in file_secrets:
            _write_private(root, secret, values[secret][0])
        os.environ["FLYTE_SECRETS_DEFAULT_DIR"] = root
        os.environ["FLYTE_SECRETS_FILE_PREFIX"] = ""


def _write_private(root: str, secret: SecretRequest, value: str) -> None:
    parts = [p.lower() for p in (secret.group, secret.group_version, secret.key) if p]
    path = os.path.join(root, *parts)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
