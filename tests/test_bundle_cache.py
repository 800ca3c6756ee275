"""The bundle cache in process: failures inside the extraction threads, and markers scoped to a boot."""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading

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
