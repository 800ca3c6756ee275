"""Put a verified, cached code bundle in front of everything else on sys.path (no second interpreter)."""
from __future__ import annotations

import os
import sys

from executor import logs
from executor.bundle.cache import POLICIES, BundleCache, BundleRef, Prepared
from executor.errors import TaskFailure


def verify_policy() -> str:
    policy = os.environ.get("EXECUTOR_BUNDLE_VERIFY", "auto").strip().lower() or "auto"
    if policy not in POLICIES:
        raise TaskFailure("BUNDLE_INTEGRITY", f"EXECUTOR_BUNDLE_VERIFY={policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def archive_md5_given(archive_md5: str | None) -> str | None:
    """The archive md5 to check (--bundle-md5, else EXECUTOR_BUNDLE_MD5), as 32 lower-case hex digits:
    it names a cache entry, so anything else is refused, never used as a path."""
    source, value = ("--bundle-md5", archive_md5) if archive_md5 else ("EXECUTOR_BUNDLE_MD5", os.environ.get("EXECUTOR_BUNDLE_MD5"))
    value = (value or "").strip()
    if not value:
        return None
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise TaskFailure("TEMPLATE_INVALID", f"{source}={value[:80]!r} is not an md5 (32 hexadecimal digits)",
                          hint="give the archive's md5 as printed by md5sum, or leave it unset")
    return value.lower()


def inject(uri: str, dest_dir: str | None, archive_md5: str | None = None) -> Prepared:
    ref = BundleRef(uri=uri, archive_md5=archive_md5_given(archive_md5), policy=verify_policy())
    prepared = BundleCache().ensure(ref)
    # First on sys.path: nothing installed in the image may shadow the user's modules.
    sys.path.insert(0, prepared.root)
    if dest_dir:
        _link_into(prepared.root, dest_dir)
    logs.info(
        "code bundle ready",
        uri=uri,
        cache="hit" if prepared.hit else "miss",
        root=prepared.root,
        verified=",".join(prepared.verified) or "nothing",
        unverified=",".join(prepared.unverified) or "-",
    )
    return prepared


def _link_into(root: str, dest_dir: str) -> None:
    """Make the bundle's top-level entries visible in --dest-dir, where flytekit would have extracted them.

    Code that opens data files relative to its working directory keeps working. Existing real files
    and directories of the image are left alone (the bundle still wins on sys.path).
    """
    os.makedirs(dest_dir, exist_ok=True)
    for name in os.listdir(root):
        link = os.path.join(dest_dir, name)
        target = os.path.join(root, name)
        if os.path.islink(link):
            if os.readlink(link) == target:
                continue
            os.unlink(link)
        elif os.path.exists(link):
            logs.debug("dest dir already holds this entry; leaving it", path=link)
            continue
        try:
            os.symlink(target, link)
        except OSError as e:
            logs.warning("could not link a bundle entry into the dest dir", path=link, reason=str(e))
