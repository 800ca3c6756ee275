"""Building bundles deterministically, and extracting them safely in process (no `tar` binary).

Extraction refuses absolute paths, `..`, links that leave the root, devices, fifos and
setuid/setgid bits, and caps total size, file count and compression ratio. A refusal raises
UnsafeBundle naming the member; the caller extracts into a staging directory and throws it away.
"""
from __future__ import annotations

import errno
import os
import stat

from executor.bundle.digest import ContentHasher, content_digest, list_files

SKIP_DIRS = frozenset({".git"})  # never walked, at any depth, as in flytekit
FIXED_MTIME = 315532800.0  # 1980-01-01 UTC, as flytekit writes it


class UnsafeBundle(Exception):
    def __init__(self, member: str, reason: str):
        super().__init__(f"member {member!r}: {reason}")
        self.member = member
        self.reason = reason


# Limits and Extracted are plain classes, not dataclasses: defining a dataclass costs a pod's cold
# start about 1 ms.
class Limits:
    __slots__ = ("max_total_bytes", "max_files", "max_ratio")

    def __init__(self, max_total_bytes: int = 4 << 30, max_files: int = 200_000, max_ratio: float = 200.0):
        self.max_total_bytes = max_total_bytes
        self.max_files = max_files
        self.max_ratio = max_ratio  # uncompressed / compressed; zip bombs run to thousands

    @classmethod
    def from_env(cls) -> "Limits":
        def read(name: str, default, parse):
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                value = parse(raw)
            except ValueError:
                value = None
            if value is None or not value > 0:  # `not >`: also refuses nan
                # A setting, not the bundle: reported as such (a ValueError would read as a damaged archive).
                from executor.errors import TaskFailure

                kind = "whole number" if parse is int else "number"
                raise TaskFailure("TEMPLATE_INVALID", f"{name}={raw!r} is invalid: it must be a {kind} above 0")
            return value

        default = cls()
        return cls(
            max_total_bytes=read("EXECUTOR_BUNDLE_MAX_BYTES", default.max_total_bytes, int),
            max_files=read("EXECUTOR_BUNDLE_MAX_FILES", default.max_files, int),
            max_ratio=read("EXECUTOR_BUNDLE_MAX_RATIO", default.max_ratio, float),
        )


# ---------------------------------------------------------------------------------------------
# Building


def _strip(info):  # a tarfile.TarInfo
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.pax_headers = {}
    return info


def build(source: str, out_dir: str) -> str:
    """Write `fast<digest>.tar.gz` for `source` into out_dir (same name and digest as flytekit's)."""
    import gzip
    import shutil
    import tarfile  # building only: extraction reads headers with tarstream

    from executor.bundle.ignore import Ignores

    ignored = Ignores(source)
    files = [rel for rel in list_files(source, SKIP_DIRS) if not ignored(rel)]
    digest = content_digest(source, files)
    os.makedirs(out_dir, exist_ok=True)
    archive = os.path.join(out_dir, f"fast{digest}.tar.gz")
    tar_path = archive + ".tar.tmp"
    with tarfile.open(tar_path, "w") as tar:
        for rel in files:
            tar.add(os.path.join(source, rel), arcname=rel, recursive=False, filter=_strip)
    tmp = archive + ".tmp"
    with open(tar_path, "rb") as raw, open(tmp, "wb") as out:
        # flytekit: GzipFile(filename=archive, mtime=0), which records the archive's name in the header
        with gzip.GzipFile(filename=archive, mode="wb", mtime=0, fileobj=out) as gz:
            shutil.copyfileobj(raw, gz)
    os.unlink(tar_path)
    os.replace(tmp, archive)
    return archive


# ---------------------------------------------------------------------------------------------
# Extracting


def _member_path(name: str) -> str:
    """The member's path relative to the root; "" for the root itself (`.`, `./`: `tar -C src .`)."""
    if name.startswith("/"):
        raise UnsafeBundle(name, "absolute path")
    if "\0" in name:
        raise UnsafeBundle(name, "NUL byte in the path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeBundle(name, "path contains '..'")
    if len(parts) > MAX_DEPTH:
        raise UnsafeBundle(name, f"nested deeper than {MAX_DEPTH} directories")
    return os.path.join(*parts) if parts else ""


def _inside(root_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


class Extracted:
    __slots__ = ("files", "total_bytes", "content_digest", "archive_md5")

    def __init__(self, files: list[str], total_bytes: int, content_digest: str | None, archive_md5: str | None):
        self.files = files  # relative paths of the regular files and links, sorted as the digest wants them
        self.total_bytes = total_bytes  # hard-link copies included
        self.content_digest = content_digest  # computed while extracting, when the archive allows it (see extract)
        self.archive_md5 = archive_md5  # with hash_archive=True


def extract(archive_path, dest: str, limits: Limits | None = None, hash_archive: bool = False) -> Extracted:
    """Extract archive_path (a path, or a growing.GrowingFile being downloaded) into dest (an empty
    staging dir).

    One pass: a thread decompresses (inflate.py), this thread parses (tarstream.py) and checks,
    another hashes (digest.py), and a few create the files (writers.py). Only regular files are
    written out of order, each under a parent already checked; every link waits until all writes
    are done, so links and their checks see exactly the tree a sequential extraction would. The
    name digest is computed in the same pass when the archive holds only regular files and
    directories in sorted order (as flytekit and `executor bundle build` write them); otherwise
    `content_digest` is None and the caller hashes the tree afterwards. hash_archive: the md5 of
    the whole archive file too, computed on the way by the decompressing thread.
    Files are created read-only: a cache entry is shared between pods. Returns only once no
    thread writes any more, also when it raises.
    """
    from executor.bundle import tarstream
    from executor.bundle.inflate import Inflater
    from executor.bundle.writers import LANES, Writers
    from executor.md5 import md5

    limits = limits or Limits.from_env()
    compressed = max(os.path.getsize(archive_path) if isinstance(archive_path, str) else archive_path.size(), 1)
    root_real = os.path.realpath(dest)
    total = 0
    extended = 0  # bytes of long-name and pax headers
    members = 0  # every member counts toward max_files, directories too: each creates something
    files: list[str] = []
    links: list[str] = []
    made_dirs = {dest}
    streaming = True  # still possible to use the in-stream digest
    previous_key = ""
    try:
        threaded = compressed >= THREADS_FROM_BYTES
        archive_hasher = md5(compressed, threaded=threaded) if hash_archive else None
        with Inflater(archive_path, archive_hasher, threaded) as stream, \
                Writers(_open_member, lanes=LANES if threaded else 0) as writers, \
                ContentHasher(background=threaded, expected_bytes=compressed) as hasher:
            for member in tarstream.members(stream):
                rel = _member_path(member.name)
                if not rel:
                    if member.isdir():
                        continue  # the root itself, as `tar -czf b.tar.gz -C src .` writes it
                    raise UnsafeBundle(member.name, "empty path")
                target = os.path.join(dest, rel)
                if member.mode & (stat.S_ISUID | stat.S_ISGID):
                    raise UnsafeBundle(member.name, "setuid/setgid bit")
                if member.ischr() or member.isblk():
                    raise UnsafeBundle(member.name, "device file")
                if member.isfifo():
                    raise UnsafeBundle(member.name, "fifo")
                if member.issparse():
                    raise UnsafeBundle(member.name, "sparse file")
                if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                    raise UnsafeBundle(member.name, f"unsupported member type {chr(member.type)!r}")
                if member.extended_bytes:  # decompressed like any data: they count toward the caps
                    extended += member.extended_bytes
                    _check_size(member.name, total + extended, compressed, limits)
                members += 1
                if members > limits.max_files:
                    raise UnsafeBundle(member.name, f"more than {limits.max_files} files and directories (EXECUTOR_BUNDLE_MAX_FILES)")
                try:
                    # Until a symlink exists in the staging tree, lexically clean paths cannot leave it. After,
                    # check where a path really leads before makedirs, which would follow a link outside
                    # (realpath resolves the part that exists; the rest, free of '..', cannot climb out).
                    parent = os.path.dirname(target)
                    if links and not _inside(root_real, parent):
                        raise UnsafeBundle(member.name, "its directory leads outside the bundle through a symlink")
                    if parent not in made_dirs:
                        os.makedirs(parent, exist_ok=True)
                        made_dirs.add(parent)
                    if member.isdir():
                        if target not in made_dirs:
                            if links and not _inside(root_real, target):
                                raise UnsafeBundle(member.name, "leads outside the bundle through a symlink")
                            os.makedirs(target, exist_ok=True)
                            made_dirs.add(target)
                        continue
                    files.append(rel)
                    if member.issym():
                        streaming = False
                        if os.path.isabs(member.linkname):
                            raise UnsafeBundle(member.name, f"symlink to an absolute path {member.linkname!r}")
                        writers.wait()
                        _create(lambda: os.symlink(member.linkname, target), member.name)
                        links.append(target)
                        if not _inside(root_real, target):
                            raise UnsafeBundle(member.name, f"symlink {member.linkname!r} points outside the bundle")
                        continue
                    if member.islnk():
                        streaming = False
                        try:
                            source = os.path.join(dest, _member_path(member.linkname))
                        except UnsafeBundle as e:
                            raise UnsafeBundle(member.name, f"hard link target {member.linkname!r}: {e.reason}") from None
                        writers.wait()  # the source must be complete
                        if not _inside(root_real, source) or not os.path.isfile(source):
                            raise UnsafeBundle(member.name, f"hard link to {member.linkname!r}, which is not a file of the bundle")
                        if os.path.lexists(target):
                            raise UnsafeBundle(member.name, "appears twice in the archive")
                        total += os.path.getsize(source)  # written out as a copy: its bytes count like a file's
                        _check_size(member.name, total + extended, compressed, limits)
                        import shutil  # hard links only: shutil pulls in bz2 and lzma

                        shutil.copyfile(source, target)
                        os.chmod(target, stat.S_IMODE(os.stat(source).st_mode))  # read-only, as every file of an entry
                        continue
                    total += member.size
                    _check_size(member.name, total + extended, compressed, limits)
                    key = target  # flytekit sorts absolute paths; same prefix, so this orders like the digest
                    if streaming and key <= previous_key:
                        streaming = False
                    previous_key = key
                    stream.seek(member.offset_data)
                    _hand_over(writers, (target, 0o555 if member.mode & 0o111 else 0o444, member.name),
                               stream.views(member.size), hasher if streaming else None)
                    if streaming:
                        hasher.end_file(rel)
                except OSError as e:
                    if e.errno not in _MEMBER_ERRNOS:
                        raise  # the disk's (full, read-only, failing), not the member's
                    raise UnsafeBundle(member.name, f"cannot be created: {e.strerror or e}") from None
            stream.finish()
            writers.wait()
            digest = hasher.hexdigest() if streaming else None
            if archive_hasher is not None:
                stream.hash_rest()
    except tarstream.TarError as e:
        raise ValueError(f"not a readable tar archive: {e}") from None
    # A later member can change where an earlier link resolves: check them all once more at the end.
    for link in links:
        if not _inside(root_real, link):
            raise UnsafeBundle(os.path.relpath(link, dest), "symlink points outside the bundle")
    files.sort(key=lambda rel: os.path.join(dest, rel))
    return Extracted(files, total, digest, archive_hasher.hexdigest() if archive_hasher is not None else None)


# What a member itself causes: it clashes with an earlier one (a file where a directory must be,
# or the reverse), its name is too long, it loops through links. Anything else is the disk's.
_MEMBER_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.ENOENT}
MAX_DEPTH = 256  # directories a member path may nest (os.makedirs recurses once per level)


def _check_size(name: str, total: int, compressed: int, limits: Limits) -> None:
    if total > limits.max_total_bytes:
        raise UnsafeBundle(name, f"bundle expands past {limits.max_total_bytes} bytes (EXECUTOR_BUNDLE_MAX_BYTES)")
    if total / compressed > limits.max_ratio and total > (1 << 20):
        raise UnsafeBundle(name, f"compression ratio above {limits.max_ratio:g} (EXECUTOR_BUNDLE_MAX_RATIO): a decompression bomb?")


# Smaller archives are extracted in the calling thread alone: starting threads and handing data
# between them costs more than the overlap gains (a 1 MiB bundle: about 8 ms instead of 20).
THREADS_FROM_BYTES = 2 << 20  # compressed
_PIECE_BYTES = 1 << 20  # a large file goes to its lane in pieces of about this size


def _hand_over(writers, open_args: tuple, views, hasher) -> None:
    """Hash a file's data in archive order and hand it to the writers, in pieces for large files."""
    pieces: list = []
    size = 0
    for view in views:
        if hasher is not None:
            hasher.update(view)
        pieces.append(view)
        size += len(view)
        if size >= _PIECE_BYTES:
            writers.submit(open_args, pieces, size, last=False)
            open_args, pieces, size = None, [], 0
    writers.submit(open_args, pieces, size, last=True)


def _open_member(target: str, mode: int, name: str) -> int:
    # O_EXCL: a member that appears twice is refused; O_NOFOLLOW: never write through a link.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return _create(lambda: os.open(target, flags, mode), name)


def _create(make, name: str):
    try:
        return make()
    except FileExistsError:
        raise UnsafeBundle(name, "appears twice in the archive") from None


def verify_content(root: str, expected: str) -> str:
    """Recompute the name digest over an extracted tree; returns it (caller compares)."""
    return content_digest(root, list_files(root))
