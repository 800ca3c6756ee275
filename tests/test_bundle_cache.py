"""The bundle cache in process: failures inside the extraction threads, and markers scoped to a boot."""
from __future__ import annotations

import io
import json
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from executor.bundle import archive, cache
from executor.bundle.cache import BundleCache, BundleRef
from executor.errors import TaskFailure

pytestmark = pytest.mark.usefixtures("extraction_threads")


def _bundle(tmp_path, files: dict[str, bytes]) -> str:
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return archive.build(str(src), str(tmp_path / "out"))


def _leftovers(root) -> list[str]:
    """Everything a failed build could have left: staging, downloads, entries (locks are expected)."""
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for sub in ("staging", "downloads", "entries") for d, dirs, names in os.walk(root / sub)
                  for n in dirs + names if not n.endswith(".inuse"))


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("executor-write", "executor-inflate", "executor-hash"))]


FILES = {f"pkg{d}/mod{i}.py": f"x = {i}\n".encode() * 500 for d in range(4) for i in range(30)}


def test_disk_error_in_a_writer_thread_is_bundle_integrity_and_leaves_nothing(tmp_path, monkeypatch):
    real_open = archive._open_member

    def open_member(target, mode, name):
        if name == "pkg2/mod7.py":
            raise OSError(28, "No space left on device", target)
        return real_open(target, mode, name)

    monkeypatch.setattr(archive, "_open_member", open_member)
    bundle = _bundle(tmp_path, FILES)
    with pytest.raises(TaskFailure) as info:
        BundleCache(str(tmp_path / "cache")).ensure(BundleRef(bundle))
    assert info.value.code == "BUNDLE_INTEGRITY" and "No space left" in str(info.value)
    assert _leftovers(tmp_path / "cache") == [] and _threads() == []


def test_duplicate_found_by_a_writer_thread_is_bundle_unsafe_and_leaves_nothing(tmp_path):
    path = tmp_path / "dup.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for data in (b"one", b"two"):
            info = tarfile.TarInfo("pkg/a.py")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(TaskFailure) as info:
        BundleCache(str(tmp_path / "cache")).ensure(BundleRef(str(path)))
    assert info.value.code == "BUNDLE_UNSAFE" and "appears twice" in str(info.value)
    assert _leftovers(tmp_path / "cache") == [] and _threads() == []


def test_entry_from_another_boot_is_rebuilt_and_older_markers_are_trusted(tmp_path):
    bundle = _bundle(tmp_path, FILES)
    root = tmp_path / "cache"
    first = BundleCache(str(root)).ensure(BundleRef(bundle))
    marker_path = root / "entries" / f"{first.key}.complete"
    marker = json.loads(marker_path.read_text())
    assert not first.hit and marker["boot"] == cache._boot_id()
    assert BundleCache(str(root)).ensure(BundleRef(bundle)).hit

    # A crash before the data reached the disk: the entry holds a torn file, the marker survived.
    torn = root / "entries" / first.key / "pkg0" / "mod0.py"
    os.chmod(torn, 0o644)
    torn.write_bytes(b"")
    marker_path.write_text(json.dumps({**marker, "boot": "another-boot"}))
    again = BundleCache(str(root)).ensure(BundleRef(bundle))
    assert not again.hit and torn.read_bytes() == FILES["pkg0/mod0.py"]
    assert json.loads(marker_path.read_text())["boot"] == cache._boot_id()

    legacy = {k: v for k, v in json.loads(marker_path.read_text()).items() if k != "boot"}
    marker_path.write_text(json.dumps(legacy))
    assert BundleCache(str(root)).ensure(BundleRef(bundle)).hit


# --- a bundle on local disk is extracted where it lies, its md5 computed on the way ---------------


def _md5(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_local_bundle_is_not_copied_and_its_given_md5_is_checked(tmp_path):
    path = _bundle(tmp_path, FILES)
    root = tmp_path / "cache"
    prepared = BundleCache(str(root)).ensure(BundleRef(path, archive_md5=_md5(path)))
    assert not prepared.hit and prepared.verified == ["given archive md5", "name digest"]
    marker = json.loads((root / "entries" / f"{prepared.key}.complete").read_text())
    assert marker["archive_md5"] == _md5(path)
    assert os.listdir(root / "downloads") == []


def test_local_bundle_with_a_wrong_md5_is_refused_after_extracting_into_staging_only(tmp_path):
    path = _bundle(tmp_path, FILES)
    root = tmp_path / "cache"
    with pytest.raises(TaskFailure) as failure:
        BundleCache(str(root)).ensure(BundleRef(path, archive_md5="0" * 32))
    assert failure.value.code == "BUNDLE_INTEGRITY"
    assert "0" * 32 in str(failure.value) and _md5(path) in str(failure.value)
    assert _leftovers(root) == [] and _threads() == []


def test_damaged_local_bundle_with_a_wrong_md5_is_reported_as_the_md5_mismatch(tmp_path):
    path = _bundle(tmp_path, FILES)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    expected = "1" * 32
    with pytest.raises(TaskFailure) as failure:
        BundleCache(str(tmp_path / "cache")).ensure(BundleRef(path, archive_md5=expected))
    assert failure.value.code == "BUNDLE_INTEGRITY"
    assert f"archive md5 is {_md5(path)}, expected {expected}" in str(failure.value)


def test_archive_md5_covers_bytes_after_the_tar_end_that_extraction_leaves_unread(tmp_path, extraction_threads):
    import gzip

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("a.py")
        info.size = 6
        t.addfile(info, io.BytesIO(b"a = 1\n"))
    path = tmp_path / "trailing.tar.gz"
    path.write_bytes(gzip.compress(tar.getvalue() + os.urandom(3 << 20)))  # 3 MiB after the end marker
    dest = tmp_path / "dest"
    dest.mkdir()
    extracted = archive.extract(str(path), str(dest), hash_archive=True)
    assert (dest / "a.py").read_bytes() == b"a = 1\n"
    assert extracted.archive_md5 == _md5(path)


# --- what is shared: verification on hits, entries in use, eviction --------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLDER = """
import sys
from executor.bundle.cache import BundleCache, BundleRef
prepared = BundleCache(sys.argv[1], max_bytes=int(sys.argv[3])).ensure(BundleRef(sys.argv[2]))
print(prepared.key, flush=True)
sys.stdin.read()  # holds the entry in use until the test closes stdin
"""


@contextlib.contextmanager
def _held_by_another_process(root, bundle: str, max_bytes: int = 10 << 30):
    """Another pod on the node: it ensures the bundle, then runs from it until the block ends. Yields its key."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), bundle, str(max_bytes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        key = proc.stdout.readline().strip()
        assert key, f"the holder failed (exit {proc.poll()})"
        yield key
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def _complete(root) -> list[str]:
    return sorted(n[: -len(".complete")] for n in os.listdir(root / "entries") if n.endswith(".complete"))


def _as_published_unverified(root, key) -> None:
    """What an older executor under EXECUTOR_BUNDLE_VERIFY=off left: another archive's files, nothing verified."""
    mod = root / "entries" / key / "pkg0" / "mod0.py"
    os.chmod(mod, 0o644)
    mod.write_bytes(b"x = 666\n")
    marker_path = root / "entries" / f"{key}.complete"
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "verified": []}))


def test_policy_off_never_publishes_where_verified_readers_look(tmp_path):
    good = _bundle(tmp_path / "good", {"wf/tasks.py": b"x = 1\n"})
    os.replace(_bundle(tmp_path / "evil", {"wf/tasks.py": b"x = 666\n"}), good)  # good's name, other files
    root = tmp_path / "cache"
    off = BundleCache(str(root)).ensure(BundleRef(good, policy="off"))
    assert (Path(off.root) / "wf" / "tasks.py").read_bytes() == b"x = 666\n" and off.verified == []
    assert off.key != BundleRef(good).name_digest
    assert BundleCache(str(root)).ensure(BundleRef(good, policy="off")).hit  # shared by off pods
    for policy in ("auto", "strict"):
        with pytest.raises(TaskFailure) as failure:
            BundleCache(str(root)).ensure(BundleRef(good, policy=policy))
        assert failure.value.code == "BUNDLE_INTEGRITY" and "name says" in str(failure.value)


def test_entry_whose_marker_records_nothing_verified_is_rebuilt_under_strict(tmp_path):
    bundle = _bundle(tmp_path, FILES)
    root = tmp_path / "cache"
    key = BundleCache(str(root)).ensure(BundleRef(bundle)).key
    _as_published_unverified(root, key)
    rebuilt = BundleCache(str(root)).ensure(BundleRef(bundle, policy="strict"))
    assert not rebuilt.hit and rebuilt.verified == ["name digest"]
    assert (root / "entries" / key / "pkg0" / "mod0.py").read_bytes() == FILES["pkg0/mod0.py"]
    assert BundleCache(str(root)).ensure(BundleRef(bundle, policy="strict")).hit


@pytest.mark.parametrize("given", [True, False], ids=["md5-given", "no-md5-given"])
def test_archive_md5_from_the_environment_is_checked_on_a_hit(tmp_path, monkeypatch, given):
    from executor.bundle import inject

    path = _bundle(tmp_path, FILES)
    monkeypatch.setenv("EXECUTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    # Without an md5 to check, a local archive is not hashed: the marker records which file it was
    # (size, mtime, inode), and a hit given an md5 hashes the archive if it still is that file.
    first = inject.inject(path, None, archive_md5=_md5(path) if given else None)
    assert not first.hit
    monkeypatch.setenv("EXECUTOR_BUNDLE_MD5", "0" * 32)
    with pytest.raises(TaskFailure) as failure:
        inject.inject(path, None)
    assert failure.value.code == "BUNDLE_INTEGRITY"
    assert f"archive md5 is {_md5(path)}, expected {'0' * 32}" in str(failure.value)
    monkeypatch.setenv("EXECUTOR_BUNDLE_MD5", _md5(path))
    again = inject.inject(path, None)
    assert again.hit and "given archive md5" in again.verified


@pytest.mark.parametrize("value", ["../../../../outside", "zz/" + "0" * 29, "0" * 31, "g" * 32])
def test_a_given_archive_md5_that_is_not_one_is_refused_before_it_names_anything(tmp_path, monkeypatch, value):
    # It names a cache entry (and its lock files): never a path, never a second entry for one archive.
    from executor.bundle import inject

    path = _bundle(tmp_path, FILES)
    monkeypatch.setenv("EXECUTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("EXECUTOR_BUNDLE_MD5", value)
    with pytest.raises(TaskFailure) as failure:
        inject.inject(path, None)
    assert failure.value.code == "TEMPLATE_INVALID" and "EXECUTOR_BUNDLE_MD5" in str(failure.value)
    with pytest.raises(TaskFailure) as failure:
        inject.inject(path, None, archive_md5=value)
    assert failure.value.code == "TEMPLATE_INVALID" and "--bundle-md5" in str(failure.value)
    assert not (tmp_path / "cache").exists()  # refused before the cache was touched


def test_an_upper_case_archive_md5_names_the_same_entry(tmp_path, monkeypatch):
    from executor.bundle import inject

    path = _bundle(tmp_path, FILES)
    monkeypatch.setenv("EXECUTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    first = inject.inject(path, None, archive_md5=_md5(path))
    again = inject.inject(path, None, archive_md5=_md5(path).upper())
    assert again.hit and again.root == first.root


def test_a_hit_checks_a_given_md5_against_the_archive_it_was_built_from_not_the_file_now(tmp_path, monkeypatch):
    # The entry was built from one archive; the file at that path is then replaced by another with
    # the same name. Given the new file's md5, a hit must not vouch for the old tree: it is rebuilt
    # from the new file (whose content then fails the name digest).
    from executor.bundle import inject

    path = _bundle(tmp_path, FILES)
    monkeypatch.setenv("EXECUTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    built_from = _md5(path)
    assert not inject.inject(path, None).hit
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(_bundle(other, {**FILES, "pkg0/mod0.py": b"x = 'changed'\n"}), path)
    assert _md5(path) != built_from
    with pytest.raises(TaskFailure) as failure:
        inject.inject(path, None, archive_md5=_md5(path))
    assert failure.value.code == "BUNDLE_INTEGRITY" and "its files digest to" in str(failure.value)


@pytest.mark.parametrize("linkname", ["missing.py", "loop", "pkg"], ids=["dangling", "loop", "to-a-directory"])
def test_a_link_the_name_digest_cannot_read_refuses_the_bundle_naming_it(tmp_path, linkname):
    # With a link in it, the digest is computed over the extracted tree, reading through links as
    # flytekit does: a link that cannot be read so is the bundle's fault (not a failed fetch to retry).
    path = tmp_path / ("fast" + "0" * 32 + ".tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("pkg/mod.py", b"v = 1\n"),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("loop" if linkname == "loop" else "link")
        link.type, link.linkname = tarfile.SYMTYPE, linkname
        tar.addfile(link)
    with pytest.raises(TaskFailure) as failure:
        BundleCache(str(tmp_path / "cache")).ensure(BundleRef(str(path)))
    assert failure.value.code == "BUNDLE_UNSAFE" and failure.value.kind.name == "NON_RECOVERABLE"
    assert f"member {link.name!r}" in str(failure.value)
    assert _leftovers(tmp_path / "cache") == []


def test_the_sweep_removes_old_leftovers_but_never_a_build_still_running(tmp_path):
    # A staging dir's mtime changes only when a top-level entry is added: an hour-long build looks
    # abandoned. Its builder's lock says otherwise.
    bundles = BundleCache(str(tmp_path / "cache"))
    staging = tmp_path / "cache" / "staging"
    running, abandoned = staging / "k.running", staging / "k.abandoned"
    for d in (running, abandoned):
        (d / "pkg").mkdir(parents=True)
        (d / "pkg" / "mod.py").write_text("x = 1\n")
        os.utime(d, (time.time() - 7200, time.time() - 7200))
    held = cache._hold(str(running))  # as _extract_and_publish holds its staging dir
    try:
        bundles._sweep_leftovers()
        assert sorted(os.listdir(staging)) == ["k.running"] and (running / "pkg" / "mod.py").exists()
    finally:
        os.close(held)
    bundles._sweep_leftovers()  # its builder is gone
    assert os.listdir(staging) == []


def test_bundle_without_a_key_hits_its_entry_in_use_instead_of_rebuilding_it(tmp_path):
    plain = tmp_path / "code.tar.gz"
    shutil.copy(_bundle(tmp_path, FILES), plain)
    root = tmp_path / "cache"
    with _held_by_another_process(root, str(plain)) as key:
        mod = root / "entries" / key / "pkg0" / "mod0.py"
        inode = mod.stat().st_ino
        again = BundleCache(str(root)).ensure(BundleRef(str(plain)))
        assert again.hit and again.key == key and mod.stat().st_ino == inode


def test_entry_in_use_is_never_removed_to_rebuild_it(tmp_path):
    bundle = _bundle(tmp_path, FILES)
    root = tmp_path / "cache"
    with _held_by_another_process(root, bundle) as key:
        _as_published_unverified(root, key)
        mod = root / "entries" / key / "pkg0" / "mod0.py"
        inode = mod.stat().st_ino
        with pytest.raises(TaskFailure) as failure:
            BundleCache(str(root)).ensure(BundleRef(bundle, policy="strict"))
        assert failure.value.code == "BUNDLE_INTEGRITY" and "another process runs from it" in str(failure.value)
        assert mod.stat().st_ino == inode and mod.read_bytes() == b"x = 666\n"
    rebuilt = BundleCache(str(root)).ensure(BundleRef(bundle, policy="strict"))  # now that nobody runs from it
    assert not rebuilt.hit and mod.read_bytes() == FILES["pkg0/mod0.py"]


def test_a_process_that_only_looked_at_a_partial_entry_does_not_stop_its_rebuild(tmp_path):
    # A killed process left an entry without its marker; another process holds the entry's in-use
    # lock for a moment (as every process does while it checks for a hit). The rebuild waits for it.
    bundle = _bundle(tmp_path, FILES)
    root = tmp_path / "cache"
    ensure = [sys.executable, "-c", "import sys; from executor.bundle.cache import BundleCache, BundleRef; "
              "p = BundleCache(sys.argv[1]).ensure(BundleRef(sys.argv[2])); print(p.key, p.hit)", str(root), bundle]
    key = subprocess.run(ensure, capture_output=True, text=True, cwd=REPO, timeout=60, check=True).stdout.split()[0]
    (root / "entries" / f"{key}.complete").unlink()
    looker = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(0.5)",
         str(root / "entries" / f"{key}.inuse")], stdout=subprocess.PIPE, text=True)
    try:
        assert looker.stdout.readline().strip() == "held"
        rebuilt = subprocess.run(ensure, capture_output=True, text=True, cwd=REPO, timeout=60)
    finally:
        looker.wait(timeout=30)
    assert rebuilt.returncode == 0 and rebuilt.stdout.split() == [key, "False"], rebuilt.stderr
    assert _complete(root) == [key] and (root / "entries" / key / "pkg0" / "mod0.py").read_bytes() == FILES["pkg0/mod0.py"]


def test_lru_eviction_by_total_size_skips_entries_in_use(tmp_path):
    b0, b1, b2, b3 = (_bundle(tmp_path / str(i), {"pkg/mod.py": f"x = {i}\n".encode() * 1000}) for i in range(4))
    root = tmp_path / "cache"
    room_for_two = 2 * 6000 + 3000  # each entry holds 6000 bytes

    def run(bundle) -> str:  # a pod that runs from the bundle, then exits
        with _held_by_another_process(root, bundle, room_for_two) as key:
            return key

    with _held_by_another_process(root, b0, room_for_two) as k0:
        k1 = run(b1)
        assert _complete(root) == sorted([k0, k1])
        k2 = run(b2)  # over the limit: the oldest entry is in use, the next oldest goes
        assert _complete(root) == sorted([k0, k2]) and not (root / "entries" / k1).exists()
    k3 = run(b3)  # nobody runs from k0 any more, and it is the least recently used
    assert _complete(root) == sorted([k2, k3]) and not (root / "entries" / k0).exists()
