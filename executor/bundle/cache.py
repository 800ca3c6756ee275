"""A content-addressed bundle cache, safe to share between every pod on a node (a hostPath).

Layout under EXECUTOR_CACHE_DIR:
    entries/<key>/            the extracted tree (read-only)
    entries/<key>.complete    marker, JSON; an entry without it is partial and is rebuilt
    entries/<key>.inuse       shared-locked by every process using the entry; eviction skips those
    locks/<key>.lock          exclusive while one process fetches and extracts <key>
    staging/, downloads/      work in progress; anything left there by a killed process is swept

<key> is the content digest from the bundle's name (fast<md5>.tar.gz), else the given archive md5,
so a hit costs a stat and a lock, never a download; a bundle with neither is named a<archive md5>
once it is downloaded. A hit gives what its marker records as verified: an entry that records
nothing (published unverified by an older executor) is rebuilt, and a given archive md5 is
checked against the one the marker records. Under EXECUTOR_BUNDLE_VERIFY=off nothing is verified,
so <key> is off-<uri hash>-<key>: only `off` pods of the same uri ever read what they publish.

Durability: nothing is fsynced. A marker names the boot it was written in
(/proc/sys/kernel/random/boot_id) and is trusted only in that boot: within one boot every process
sees the page cache, so a marker written after the data is enough; after a crash or reboot the
data may never have reached the disk, so such an entry is rebuilt on first use. Syncing instead
(syncfs before the marker) would make every cold start wait for its whole bundle to be written
back; a reboot costs one download per bundle instead.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field

from executor import logs, storage
from executor.bundle.digest import digest_from_name
from executor.errors import TaskFailure

POLICIES = ("strict", "auto", "off")
PUBLISH_WAIT_S = 2.0  # for processes that merely looked at an unusable entry to let go of it
_held: dict[str, int] = {}  # .inuse path -> fd, shared-locked for the life of the process


@dataclass(frozen=True)
class BundleRef:
    uri: str
    archive_md5: str | None = None  # --bundle-md5 / EXECUTOR_BUNDLE_MD5 / Flyte 2's --version
    policy: str = "auto"

    @property
    def name_digest(self) -> str | None:
        return digest_from_name(self.uri)


@dataclass
class Prepared:
    root: str
    key: str
    hit: bool
    verified: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)


def default_cache_dir() -> str:
    return os.environ.get("EXECUTOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "executor", "bundles"
    )


class BundleCache:
    def __init__(self, root: str | None = None, max_bytes: int | None = None):
        self.root = os.path.abspath(root or default_cache_dir())
        self.max_bytes = max_bytes if max_bytes is not None else int(os.environ.get("EXECUTOR_CACHE_MAX_BYTES", 10 << 30))
        try:
            self._make_dirs()
        except OSError as e:
            # A fresh hostPath is often root-owned while the task runs as a user: run, but say why it is slow.
            fallback = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"executor-bundles-{os.getuid()}")
            logs.warning(
                "bundle cache is not writable; using a private cache for this pod",
                cache=self.root, reason=e.strerror or str(e), fallback=fallback,
                hint="make the hostPath writable by the task's uid (an init container can chown it)",
            )
            self.root = fallback
            self._make_dirs()

    def _make_dirs(self) -> None:
        for sub in ("entries", "locks", "staging", "downloads"):
            path = os.path.join(self.root, sub)
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", path)

    def _entry(self, key: str) -> str:
        return os.path.join(self.root, "entries", key)

    # --- public ---------------------------------------------------------------------------

    def ensure(self, ref: BundleRef) -> Prepared:
        key = self._key(ref)
        if key:
            hit = self._hit(key, ref)
            if hit:
                return hit
        with self._locked(key or "uri-" + _short_hash(ref.uri)):
            if key:
                hit = self._hit(key, ref)  # another process may have built it while we waited
                if hit:
                    return hit
            return self._build(ref, key)

    @staticmethod
    def _key(ref: BundleRef, archive_md5: str | None = None) -> str | None:
        key = ref.name_digest or ref.archive_md5 or (archive_md5 and f"a{archive_md5}")
        if key and ref.policy == "off":
            # Nothing was checked against the key: a namespace that verifying readers never look in,
            # shared only with off pods of this uri (which would take whatever it holds anyway).
            key = f"off-{_short_hash(ref.uri)[:16]}-{key}"
        return key

    # --- hits -------------------------------------------------------------------------------

    def _hit(self, key: str, ref: BundleRef | None = None) -> Prepared | None:
        """ref: what the entry must satisfy. None: the caller verified the archive whose md5 names the entry."""
        newly_held = self._mark_in_use(key)  # before reading the marker: eviction cannot take what we find
        hit = None
        try:
            hit = self._complete_entry(key, ref)
        finally:
            if hit is None and newly_held:
                self._release(key)  # a miss holds nothing: whoever rebuilds it may have to replace it
        return hit

    def _complete_entry(self, key: str, ref: BundleRef | None) -> Prepared | None:
        entry = self._entry(key)
        try:
            with open(entry + ".complete") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            return None
        boot = marker.get("boot")  # None: written by an older executor, trusted as it was then
        if boot is not None and boot != _boot_id():
            return None  # written before a reboot: its data may never have reached the disk
        if not os.path.isdir(entry):
            return None
        verified = list(marker.get("verified", []))
        if ref is not None and ref.policy != "off":
            if not verified:
                return None  # published unverified (an older executor under off): rebuilt, and verified
            if ref.archive_md5:
                # Downloads record the archive md5. A local archive extracted with no md5 to check was
                # not hashed (it would cost small bundles a tenth of their cold start): its size, mtime
                # and inode were recorded, and it is hashed now only if it still is that file.
                archive_md5 = marker.get("archive_md5")
                if archive_md5 is None:
                    local = _local_path(ref)
                    if local is None or marker.get("archive_stat") is None or marker["archive_stat"] != _stat_id(local):
                        return None  # rebuilt from the archive as it is now
                    archive_md5 = _file_md5(local)
                checked, _ = self._verify_archive(ref, archive_md5, None)  # a mismatch fails as on a miss
                verified += [v for v in checked if v not in verified]
        try:
            os.utime(entry + ".complete")  # LRU clock
        except OSError:
            pass
        return Prepared(entry, key, hit=True, verified=verified)

    def _mark_in_use(self, key: str) -> bool:
        """Shared-locks the entry's .inuse for the life of the process; False if it already was."""
        path = self._entry(key) + ".inuse"
        if path in _held:
            return False
        fd = self._open_in_use(key)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _held[path] = fd
        return True

    def _open_in_use(self, key: str) -> int:
        """The entry's .inuse: shared-locked by every process running from the entry, exclusively by
        one removing it."""
        return os.open(self._entry(key) + ".inuse", os.O_RDWR | os.O_CREAT, 0o666)

    def _release(self, key: str) -> None:
        fd = _held.pop(self._entry(key) + ".inuse", None)
        if fd is not None:
            os.close(fd)  # a forked child's copy of the fd keeps its hold

    # --- misses -----------------------------------------------------------------------------

    def _build(self, ref: BundleRef, key: str | None) -> Prepared:
        self._sweep_leftovers()
        try:
            # A bundle on local disk is extracted where it lies, hashed on the way (no copy first).
            source = storage.local_file(ref.uri)
        except storage.StorageError as e:
            raise self._fetch_failure(ref, e) from None
        if source is not None:
            return self._extract_and_publish(ref, key, source, archive_md5=None, stored=None)
        download = os.path.join(self.root, "downloads", f"{os.urandom(16).hex()}.tar.gz")
        try:
            return self._download_and_extract(ref, key, download)
        finally:
            try:
                os.unlink(download)
            except OSError:
                pass

    def _download_and_extract(self, ref: BundleRef, key: str | None, download: str) -> Prepared:
        """The download runs in a thread while this one extracts what has arrived into staging; the
        archive md5 is checked once the download is complete, before anything is published. If the
        first download attempt fails and storage retries, the whole download is extracted after."""
        import threading

        from executor.bundle.growing import Abandoned, GrowingFile

        growing = GrowingFile()
        outcome: dict = {}

        def fetch() -> None:
            try:
                outcome["md5"] = self._download(ref, download, growing)
            except BaseException as e:  # raised by downloaded(), in the caller's thread
                outcome["error"] = e
            finally:
                growing.end()

        fetcher = threading.Thread(target=fetch, name="executor-bundle-fetch", daemon=True)
        fetcher.start()

        def downloaded(followed: bool = True) -> tuple[str, str | None]:
            growing.join_writer(fetcher)
            if "error" in outcome:
                raise outcome["error"]
            if followed and growing.followed_attempt_failed:  # what was extracted came from an attempt that did not complete
                raise Abandoned("the download attempt that extraction followed did not complete")
            return outcome["md5"]

        try:
            return self._extract_and_publish(ref, key, growing, downloaded=downloaded)
        except Abandoned:
            return self._extract_and_publish(ref, key, download, *downloaded(followed=False))
        finally:
            growing.join_writer(fetcher)  # an extraction that stopped early: the download still ends, unread
            growing.close()

    def _download(self, ref: BundleRef, download: str, progress=None) -> tuple[str, str | None]:
        try:
            # Not durable: the archive is deleted right after extraction.
            return storage.download_hashed(ref.uri, download, durable=False, progress=progress)
        except storage.StorageError as e:
            raise self._fetch_failure(ref, e) from None

    @staticmethod
    def _fetch_failure(ref: BundleRef, e: Exception) -> TaskFailure:
        if isinstance(e, storage.StorageNotFound):
            return TaskFailure("BUNDLE_FETCH", f"code bundle {ref.uri} does not exist", recoverable=False,
                               hint="was the bundle uploaded by registration? check --additional-distribution / --tgz")
        return TaskFailure("BUNDLE_FETCH", f"cannot download code bundle: {e}", cause=e)

    def _extract_and_publish(self, ref: BundleRef, key: str | None, archive, archive_md5: str | None = None,
                             stored: str | None = None, downloaded=None) -> Prepared:
        """archive_md5 given (downloaded): checked before anything is extracted. downloaded given (the
        archive is a GrowingFile): it returns (archive_md5, stored) once the download is complete,
        checked before anything is published. Neither (a local file): hashed while extracting if
        there is an md5 to check, and checked before anything is published."""
        # A local archive is hashed on the way only if there is an md5 to check it against or to name the entry by.
        hash_archive = archive_md5 is None and downloaded is None and bool(ref.archive_md5 or not key)
        local_stat = _stat_id(archive) if archive_md5 is None and downloaded is None else None
        if archive_md5 is not None:
            verified, unverified = self._verify_archive(ref, archive_md5, stored)
        staging = os.path.join(self.root, "staging", f"{key or 'bundle'}.{os.urandom(16).hex()}")
        os.makedirs(staging)
        building = _hold(staging)  # however long the build takes, no other process's sweep removes it
        try:
            try:
                extracted = self._extract(archive, staging, hash_archive)
            except TaskFailure:
                if downloaded is not None:  # damaged bytes are explained by a wrong md5 (or a failed fetch)
                    self._verify_archive(ref, *downloaded())
                elif hash_archive and ref.archive_md5:
                    self._verify_archive(ref, _file_md5(archive), None)  # a wrong md5 explains the damage
                raise
            if downloaded is not None:
                archive_md5, stored = downloaded()
                verified, unverified = self._verify_archive(ref, archive_md5, stored)
            elif archive_md5 is None:
                archive_md5 = extracted.archive_md5  # None unless hash_archive
                verified, unverified = self._verify_archive(ref, archive_md5, stored)
            if ref.name_digest and ref.policy != "off":
                actual = extracted.content_digest or _tree_digest(staging, extracted)
                if actual != ref.name_digest:
                    raise TaskFailure(
                        "BUNDLE_INTEGRITY",
                        f"code bundle {ref.uri}: its files digest to {actual}, but its name says {ref.name_digest}",
                        hint="the archive was modified after it was built; nothing from it was run",
                    )
                verified.append("name digest")
            elif ref.policy != "off":
                unverified.append("name digest (the file name is not fast<md5>.tar.gz)")
            if ref.policy == "strict" and not verified:
                raise TaskFailure("BUNDLE_INTEGRITY", f"code bundle {ref.uri}: nothing could be verified and the policy is strict",
                                  hint="give --bundle-md5, or use a fast<md5>.tar.gz name, or set EXECUTOR_BUNDLE_VERIFY=auto")
            if key:
                return self._publish(key, staging, extracted, archive_md5, verified, unverified, local_stat)
            # Named by the md5 just computed: another uri (or another run) may have published it, and be using it.
            key = self._key(ref, archive_md5)
            with self._locked(key):
                hit = self._hit(key)
                if hit:
                    return Prepared(hit.root, key, hit=True, verified=verified, unverified=unverified)
                return self._publish(key, staging, extracted, archive_md5, verified, unverified, local_stat)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(building)

    def _verify_archive(self, ref: BundleRef, archive_md5: str | None, stored: str | None) -> tuple[list[str], list[str]]:
        verified: list[str] = []
        unverified: list[str] = []
        if ref.policy == "off":
            return verified, ["everything (EXECUTOR_BUNDLE_VERIFY=off)"]
        if ref.archive_md5:
            if ref.archive_md5.lower() != archive_md5:
                raise TaskFailure("BUNDLE_INTEGRITY",
                                  f"code bundle {ref.uri}: archive md5 is {archive_md5}, expected {ref.archive_md5}",
                                  hint="the bundle changed since the expected md5 was recorded; nothing from it was run")
            verified.append("given archive md5")
        if stored:
            if stored != archive_md5:
                raise TaskFailure("BUNDLE_INTEGRITY",
                                  f"code bundle {ref.uri}: downloaded bytes have md5 {archive_md5}, the store says {stored}",
                                  hint="the download was corrupted or the object changed during the download")
            verified.append("store md5")
        elif "://" in ref.uri and not ref.uri.startswith("file://"):
            unverified.append("store md5 (multipart upload or not provided)")
        return verified, unverified

    def _extract(self, archive_path: str, staging: str, hash_archive: bool):
        from executor.bundle import archive  # only a miss pays for the extraction threads

        try:
            return archive.extract(archive_path, staging, hash_archive=hash_archive)
        except archive.UnsafeBundle as e:
            raise TaskFailure("BUNDLE_UNSAFE", f"code bundle refused, {e}",
                              hint="bundles may hold only regular files, directories and links that stay inside") from None
        except (OSError, EOFError, ValueError) as e:  # truncated or not a gzip tar
            raise TaskFailure("BUNDLE_INTEGRITY", f"code bundle is not a readable tar.gz: {type(e).__name__}: {e}") from None

    def _publish(self, key, staging, extracted, archive_md5, verified, unverified, local_stat=None) -> Prepared:
        entry = self._entry(key)
        fd = self._open_in_use(key)
        try:
            if os.path.lexists(entry):  # partial (a killed process), from another boot, or unverified
                self._release(key)  # this process's own hold on what it replaces
                # Processes that only looked at it (and found it unusable, as we did) let go at once.
                if not _lock_unused(fd, wait_s=PUBLISH_WAIT_S):
                    raise TaskFailure(
                        "BUNDLE_INTEGRITY",
                        f"the cached copy {entry} of the code bundle is incomplete or unverified, and it cannot be "
                        "rebuilt while another process runs from it",
                        hint="an unverified copy comes from an older executor under EXECUTOR_BUNDLE_VERIFY=off; "
                             "it is rebuilt once no process runs from it",
                    )
                self._remove_entry(key)
            fcntl.flock(fd, fcntl.LOCK_SH)  # in use before it appears: eviction never takes it from us
        except BaseException:
            os.close(fd)
            raise
        _held[entry + ".inuse"] = fd
        os.rename(staging, entry)
        marker = {"key": key, "archive_md5": archive_md5, "files": len(extracted.files), "bytes": extracted.total_bytes,
                  "verified": verified, "created": time.time(), "boot": _boot_id()}
        if archive_md5 is None and local_stat is not None:
            marker["archive_stat"] = local_stat  # which local file it was built from (see _complete_entry)
        if not marker["boot"]:
            os.sync()  # no boot id to scope the marker to: the data must be on disk before it
        self._replace(entry + ".complete", json.dumps(marker).encode())
        self._evict()
        return Prepared(entry, key, hit=False, verified=verified, unverified=unverified)

    def _replace(self, path: str, data: bytes) -> None:
        """Atomic (readers see no file or the whole file), not durable: see the module doc."""
        tmp = os.path.join(self.root, "staging", f"marker.{os.urandom(8).hex()}")  # swept if we are killed
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # --- housekeeping -----------------------------------------------------------------------

    class _Lock:
        def __init__(self, path: str):
            self.path = path

        def __enter__(self):
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return self

        def __exit__(self, *exc):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)

    def _locked(self, name: str) -> "_Lock":
        return self._Lock(os.path.join(self.root, "locks", f"{name}.lock"))

    def _sweep_leftovers(self) -> None:
        """Staging dirs and downloads older than an hour belong to killed processes, unless a live
        process still holds its lock on one (a staging dir's mtime stays put while files are added
        below its top level: a long build looks old)."""
        cutoff = time.time() - 3600
        for sub in ("staging", "downloads"):
            base = os.path.join(self.root, sub)
            for name in os.listdir(base):
                path = os.path.join(base, name)
                try:
                    if os.path.getmtime(path) >= cutoff:
                        continue
                    held = _hold(path, wait=False)
                    if held is None:
                        continue  # being built
                    try:
                        _make_writable(path)
                        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
                    finally:
                        os.close(held)
                except OSError:
                    pass

    def _evict(self) -> None:
        entries_dir = os.path.join(self.root, "entries")
        markers = []
        for name in os.listdir(entries_dir):
            if name.endswith(".complete"):
                path = os.path.join(entries_dir, name)
                try:
                    with open(path) as f:
                        size = json.load(f).get("bytes", 0)
                    markers.append((os.path.getmtime(path), name[: -len(".complete")], size))
                except (OSError, ValueError):
                    continue
        total = sum(size for _, _, size in markers)
        for _, key, size in sorted(markers):
            if total <= self.max_bytes:
                break
            if self._remove_unused(key):
                total -= size

    def _remove_unused(self, key: str) -> bool:
        fd = self._open_in_use(key)
        try:
            if not _lock_unused(fd) or not self._remove_entry(key):
                return False  # in use, or evicted by another process meanwhile
            logs.info("evicted bundle from the cache", key=key)
            return True
        finally:
            os.close(fd)

    def _remove_entry(self, key: str) -> bool:
        """The marker first, then the tree (the caller holds .inuse exclusively); False if there was no marker."""
        entry = self._entry(key)
        try:
            os.unlink(entry + ".complete")
            had_marker = True
        except FileNotFoundError:
            had_marker = False
        _make_writable(entry)
        shutil.rmtree(entry, ignore_errors=True)
        return had_marker


_boot: list[str] = []


def _boot_id() -> str:
    """This boot's id ("" where the kernel does not say): markers are trusted only in their boot."""
    if not _boot:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _boot.append(f.read().strip())
        except OSError:
            _boot.append("")
    return _boot[0]


def _lock_unused(fd: int, wait_s: float = 0.0) -> bool:
    """Exclusive lock on an entry's .inuse, unless some process is running from the entry (still,
    after wait_s)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _tree_digest(staging: str, extracted) -> str:
    """The name digest over the extracted tree (an archive with links, or out of order): what cannot
    be read as flytekit reads it (a dangling or looping link, a name that is not UTF-8) is refused."""
    from executor.bundle.digest import content_digest

    try:
        return content_digest(staging, extracted.files, extracted.total_bytes)
    except OSError as e:
        member = os.path.relpath(e.filename, staging) if e.filename else "?"
        raise TaskFailure("BUNDLE_UNSAFE", f"code bundle refused, member {member!r}: cannot be read to check its digest "
                          f"({e.strerror or e})", hint="links in a bundle must lead to files of the bundle") from None
    except UnicodeError as e:
        raise TaskFailure("BUNDLE_UNSAFE", f"code bundle refused: a member's name is not UTF-8 ({e})") from None


def _local_path(ref: BundleRef) -> str | None:
    try:
        return storage.local_file(ref.uri)
    except storage.StorageError:
        return None


def _stat_id(path: str) -> list[int] | None:
    """A local file as it is now: size, mtime (ns), inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _hold(path: str, wait: bool = True) -> int | None:
    """An fd holding an exclusive lock on path (a directory or a file); without wait, None if another
    process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_md5(path: str) -> str:
    from executor.md5 import md5 as new_md5

    md5 = new_md5(os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


def _make_writable(root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                try:
                    os.chmod(path, os.stat(path).st_mode | 0o200)
                except OSError:
                    pass
