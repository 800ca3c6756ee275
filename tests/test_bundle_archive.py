"""Bundle archives: flytekit's digest, deterministic build, and refusal of every unsafe member."""
from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from executor.bundle import archive, digest
from executor.bundle.archive import Limits, UnsafeBundle


pytestmark = pytest.mark.usefixtures("extraction_threads")


@pytest.fixture(autouse=True, params=["auto", "zlib"], ids=["isal", "zlib"])
def inflate_codec(request, monkeypatch):
    """Every extraction test runs with isal's inflate (installed with the test extra) and with zlib's."""
    monkeypatch.setenv("EXECUTOR_BUNDLE_INFLATE", request.param)
    from executor.bundle.inflate import gzip_codec

    assert gzip_codec().__name__ == ("isal.isal_zlib" if request.param == "auto" else "zlib")


def _tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _malicious(tmp_path, *members) -> str:
    """A tar.gz holding the given (TarInfo, data-or-None) members, as an attacker would write it."""
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return str(path)


def _info(name, kind=tarfile.REGTYPE, linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def test_build_is_deterministic_and_named_by_content(tmp_path):
    src = _tree(tmp_path / "src", {"pkg/__init__.py": b"", "pkg/mod.py": b"x = 1\n", "main.py": b"print()\n",
                                   "pkg/__pycache__/mod.cpython-311.pyc": b"junk", ".git/HEAD": b"ref"})
    a = archive.build(str(src), str(tmp_path / "a"))
    b = archive.build(str(src), str(tmp_path / "b"))
    assert open(a, "rb").read() == open(b, "rb").read()
    name_digest = digest.digest_from_name(a)
    assert name_digest and os.path.basename(a) == f"fast{name_digest}.tar.gz"
    with tarfile.open(a) as tar:
        names = sorted(tar.getnames())
        assert names == ["main.py", "pkg/__init__.py", "pkg/mod.py"]  # no caches, no .git
        assert {m.mtime for m in tar} == {315532800} and {m.uid for m in tar} == {0}
    out = tmp_path / "x"
    out.mkdir()
    extracted = archive.extract(a, str(out))
    assert extracted.files == ["main.py", "pkg/__init__.py", "pkg/mod.py"]
    # sorted regular files only: the name digest comes out of the same pass, and agrees with a re-hash
    assert extracted.content_digest == name_digest == digest.content_digest(str(out))
    (src / "pkg/mod.py").write_bytes(b"x = 2\n")
    assert digest.digest_from_name(archive.build(str(src), str(tmp_path / "c"))) != name_digest


def test_digest_from_name():
    assert digest.digest_from_name("s3://b/p/fast0123456789abcdef0123456789abcdef.tar.gz") == "0123456789abcdef0123456789abcdef"
    assert digest.digest_from_name("s3://b/p/code.tar.gz") is None


@pytest.mark.parametrize("member, reason", [
    ((_info("/etc/passwd"), b"x"), "absolute path"),
    ((_info("../outside.py"), b"x"), "'..'"),
    ((_info("a/../../outside.py"), b"x"), "'..'"),
    ((_info("link", tarfile.SYMTYPE, "/etc/passwd"), None), "absolute path"),
    ((_info("link", tarfile.SYMTYPE, "../../etc"), None), "outside the bundle"),
    ((_info("hard", tarfile.LNKTYPE, "../etc/passwd"), None), "'..'"),
    ((_info("hard", tarfile.LNKTYPE, "never_extracted.py"), None), "not a file of the bundle"),
    ((_info("dev", tarfile.CHRTYPE), None), "device"),
    ((_info("blk", tarfile.BLKTYPE), None), "device"),
    ((_info("pipe", tarfile.FIFOTYPE), None), "fifo"),
    ((_info("suid", mode=0o4755), b"x"), "setuid"),
    ((_info("sgid", mode=0o2755), b"x"), "setuid"),
])
def test_unsafe_members_are_refused(tmp_path, member, reason):
    path = _malicious(tmp_path, member)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle) as info:
        archive.extract(path, str(dest))
    assert reason in str(info.value) and member[0].name in str(info.value)
    assert not (tmp_path / "outside.py").exists()


def test_an_archive_of_dot_and_names_with_a_colon_are_extracted(tmp_path):
    # `tar -czf b.tar.gz -C src .` writes the root as "." and every path under "./"; on POSIX
    # "a:b.txt" is a file name like any other.
    src = _tree(tmp_path / "src", {"pkg/mod.py": b"v = 1\n", "a:b.txt": b"colon\n"})
    path = tmp_path / "dot.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=".")
    dest = tmp_path / "dest"
    dest.mkdir()
    extracted = archive.extract(str(path), str(dest))
    assert sorted(extracted.files) == ["a:b.txt", "pkg/mod.py"]
    assert (dest / "pkg" / "mod.py").read_bytes() == b"v = 1\n" and (dest / "a:b.txt").read_bytes() == b"colon\n"


@pytest.mark.parametrize("members, culprits", [
    # a file where a directory must be (which of the two is named depends on which is created first:
    # files are written by other threads)
    ([(_info("a"), b"x"), (_info("a/b"), b"y")], ("a", "a/b")),
    ([(_info("a"), b"x"), (_info("a", tarfile.DIRTYPE), None)], ("a",)),  # a directory over a file
    ([(_info("/".join(["d"] * 300) + "/f"), b"x")], ("/".join(["d"] * 300) + "/f",)),  # deeper than makedirs goes
])
def test_a_member_that_cannot_be_created_is_refused_by_name(tmp_path, members, culprits):
    path = _malicious(tmp_path, *members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle) as info:
        archive.extract(path, str(dest))
    assert info.value.member in culprits


def test_a_hard_link_copy_is_read_only_like_every_file_of_an_entry(tmp_path):
    path = _malicious(tmp_path, (_info("real.py"), b"v = 1\n"), (_info("copy.py", tarfile.LNKTYPE, "real.py"), None))
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.extract(path, str(dest))
    assert stat.S_IMODE(os.stat(dest / "copy.py").st_mode) == stat.S_IMODE(os.stat(dest / "real.py").st_mode) == 0o444


def test_pax_headers_count_toward_the_ratio_cap(tmp_path):
    # Extended headers are decompressed like data: 20 members each behind 1 MB of pax comment make
    # a ~20 MB expansion of a ~30 KB archive, past the ratio cap though no file is large.
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for i in range(20):
            info = tarfile.TarInfo(f"m{i}.py")
            info.pax_headers = {"comment": "x" * 1_000_000}
            info.size = 2
            tar.addfile(info, io.BytesIO(b"x\n"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="compression ratio"):
        archive.extract(str(path), str(dest))


def test_symlink_dot_then_dotdot_escape_is_refused(tmp_path):
    # 'here' -> '.' is harmless alone; 'here/..' lexically stays inside but really is the parent
    path = _malicious(tmp_path, (_info("here", tarfile.SYMTYPE, "."), None),
                      (_info("up", tarfile.SYMTYPE, "here/.."), None))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="up"):
        archive.extract(path, str(dest))


def test_write_through_escaping_directory_link_is_refused(tmp_path):
    (tmp_path / "victim").mkdir()
    path = _malicious(tmp_path, (_info("d", tarfile.SYMTYPE, "../victim"), None), (_info("d/evil.py"), b"pwned"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle):
        archive.extract(path, str(dest))
    assert not (tmp_path / "victim" / "evil.py").exists()


def test_safe_links_inside_are_kept(tmp_path):
    path = _malicious(tmp_path, (_info("pkg/real.py"), b"v = 1\n"),
                      (_info("pkg/alias.py", tarfile.SYMTYPE, "real.py"), None),
                      (_info("copy.py", tarfile.LNKTYPE, "pkg/real.py"), None))
    dest = tmp_path / "dest"
    dest.mkdir()
    extracted = archive.extract(path, str(dest))
    assert len(extracted.files) == 3 and extracted.content_digest is None  # links: hashed afterwards
    assert (dest / "pkg/alias.py").read_bytes() == b"v = 1\n" and (dest / "copy.py").read_bytes() == b"v = 1\n"


def test_decompression_bomb_is_refused(tmp_path):
    path = _malicious(tmp_path, (_info("zeros.bin"), b"\0" * (64 << 20)))
    assert os.path.getsize(path) < (1 << 20)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="compression ratio"):
        archive.extract(path, str(dest))


@pytest.mark.parametrize("limits, fragment", [
    (Limits(max_files=2), "more than 2 files"),
    (Limits(max_total_bytes=10), "expands past 10 bytes"),
])
def test_size_and_count_caps(tmp_path, limits, fragment):
    path = _malicious(tmp_path, *[(_info(f"f{i}.py"), b"0123456789abc") for i in range(3)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match=fragment):
        archive.extract(path, str(dest), limits)


def test_executable_bit_kept_setuid_never(tmp_path):
    path = _malicious(tmp_path, (_info("run.sh", mode=0o755), b"#!/bin/sh\n"), (_info("data.txt", mode=0o666), b"d"))
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.extract(path, str(dest))
    assert os.stat(dest / "run.sh").st_mode & stat.S_IXUSR
    assert not os.stat(dest / "data.txt").st_mode & (stat.S_IXUSR | stat.S_IWOTH)
    # entries are shared between pods: nothing in them is writable
    assert not os.stat(dest / "run.sh").st_mode & 0o222 and not os.stat(dest / "data.txt").st_mode & 0o222


def test_unsorted_archive_falls_back_to_hashing_the_tree(tmp_path):
    path = _malicious(tmp_path, (_info("b.py"), b"b"), (_info("a.py"), b"a"))
    dest = tmp_path / "dest"
    dest.mkdir()
    extracted = archive.extract(path, str(dest))
    assert extracted.content_digest is None
    assert extracted.files == ["a.py", "b.py"]
    assert digest.content_digest(str(dest), extracted.files) == digest.content_digest(str(dest))


def test_duplicate_member_is_refused(tmp_path):
    path = _malicious(tmp_path, (_info("a.py"), b"one"), (_info("a.py"), b"two"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="appears twice"):
        archive.extract(path, str(dest))


# --- the pipelined extraction: decompressing thread, writer lanes --------------------------------


def _our_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith(("executor-write", "executor-inflate", "executor-hash"))]


def test_large_member_goes_to_its_lane_in_pieces(tmp_path):
    big = os.urandom(3 << 20) + b"tail"  # several pieces, not a multiple of the piece size
    path = _malicious(tmp_path, (_info("a/big.bin"), big), (_info("a/small.py"), b"s = 1\n"), (_info("b/c.py"), b""))
    dest = tmp_path / "dest"
    dest.mkdir()
    extracted = archive.extract(path, str(dest))
    assert (dest / "a/big.bin").read_bytes() == big and (dest / "b/c.py").read_bytes() == b""
    assert extracted.content_digest == digest.content_digest(str(dest))
    assert _our_threads() == []


def test_error_in_a_writer_lane_is_raised_by_extract_after_every_thread_stopped(tmp_path, monkeypatch):
    opened = []

    def failing_open(target, mode, name):
        opened.append(name)
        if name == "d/f7.py":
            raise OSError(28, "No space left on device", target)
        return real_open(target, mode, name)

    real_open = archive._open_member
    monkeypatch.setattr(archive, "_open_member", failing_open)
    path = _malicious(tmp_path, *[(_info(f"{d}/f{i}.py"), b"x" * 5000) for d in "abcd" for i in range(20)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(OSError, match="No space left"):
        archive.extract(path, str(dest))
    assert _our_threads() == []
    files_after = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert set(files_after) <= set(opened)  # nothing is written once extract() has returned
    import time

    time.sleep(0.1)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == files_after


def test_writers_raise_the_first_lane_error_in_the_caller(tmp_path):
    from executor.bundle.writers import Writers

    def open_file(target, mode):
        if target.endswith("bad"):
            raise PermissionError(13, "denied", target)
        return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    with pytest.raises(PermissionError):
        with Writers(open_file, lanes=2) as writers:
            writers.submit((str(tmp_path / "ok"), 0o644), [b"a", memoryview(b"bc")], 3, last=False)
            writers.submit(None, [b"d"], 1, last=True)
            writers.submit((str(tmp_path / "bad"), 0o644), [b"x"], 1, last=True)
            for i in range(100):  # the error surfaces from a later submit() or from wait()
                writers.submit((str(tmp_path / f"later{i}"), 0o644), [b"y"], 1, last=True)
            writers.wait()
    assert (tmp_path / "ok").read_bytes() == b"abcd"
    assert _our_threads() == []


def test_writers_write_every_file_handed_over_in_batches_also_without_a_wait(tmp_path):
    from executor.bundle import writers as writers_module
    from executor.bundle.writers import Writers

    def open_file(target, mode):
        return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    expected = {}
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    with Writers(open_file, lanes=2) as writers:
        # One file larger than a batch, in pieces; then more small files per directory than a batch
        # holds, interleaved across directories (lanes); the block is left without writers.wait().
        big = os.urandom(writers_module.BATCH_BYTES * 3)
        third = len(big) // 3
        writers.submit((str(tmp_path / "c" / "big"), 0o644), [big[:third]], third, last=False)
        writers.submit(None, [big[third:2 * third]], third, last=False)
        writers.submit(None, [big[2 * third:]], len(big) - 2 * third, last=True)
        expected[tmp_path / "c" / "big"] = big
        for i in range(writers_module.BATCH_OPS * 2 + 5):
            for d in ("a", "b"):
                path = tmp_path / d / f"f{i}"
                data = f"{d}{i}".encode() * (i + 1)
                writers.submit((str(path), 0o644), [data[:3], memoryview(data)[3:]], len(data), last=True)
                expected[path] = data
    assert {p: p.read_bytes() for p in expected} == expected
    assert _our_threads() == []


@pytest.mark.parametrize("damage, error", [
    (lambda data: data[: len(data) // 2], EOFError),  # truncated
    (lambda data: data[:-8] + bytes([data[-8] ^ 1]) + data[-7:], ValueError),  # CRC-32 in the gzip trailer
    (lambda data: data + b"garbage", ValueError),  # neither another gzip member nor zero padding
])
def test_damaged_gzip_is_refused(tmp_path, damage, error):
    path = _malicious(tmp_path, (_info("a.py"), b"a = 1\n"))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(error):
        archive.extract(path, str(dest))
    assert _our_threads() == []


def test_concatenated_gzip_members_and_zero_padding_are_read(tmp_path):
    import gzip

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = _info("a.py")
        info.size = 6
        t.addfile(info, io.BytesIO(b"a = 1\n"))
    raw = tar.getvalue()
    path = tmp_path / "multi.tar.gz"
    path.write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:]) + b"\0" * 100)
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.extract(str(path), str(dest))
    assert (dest / "a.py").read_bytes() == b"a = 1\n"


def test_sparse_member_is_refused(tmp_path):
    path = tmp_path / "sparse.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = _info("holes.bin", tarfile.GNUTYPE_SPARSE)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"data"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="sparse"):
        archive.extract(str(path), str(dest))


def test_bomb_refusal_stops_the_decompressing_thread(tmp_path):
    path = _malicious(tmp_path, (_info("zeros.bin"), b"\0" * (64 << 20)), (_info("more.bin"), b"\0" * (64 << 20)))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="compression ratio"):
        archive.extract(path, str(dest))
    assert _our_threads() == []


# --- caps and containment that links or directories could get around ------------------------------


@pytest.mark.parametrize("limits, fragment", [
    (Limits(max_total_bytes=2 << 20, max_ratio=float("inf")), "expands past"),
    (Limits(), "compression ratio"),
])
def test_hard_link_copies_count_toward_the_caps(tmp_path, limits, fragment):
    # each hard link is written out as a copy: 50 of them to 1 MiB would be 51 MiB from a ~2 KiB archive
    path = _malicious(tmp_path, (_info("big"), b"\0" * (1 << 20)),
                      *[(_info(f"h{i}", tarfile.LNKTYPE, "big"), None) for i in range(50)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match=fragment) as info:
        archive.extract(path, str(dest), limits)
    assert info.value.member in ("h0", "h1")
    assert len(os.listdir(dest)) <= 2


def test_directories_count_toward_the_file_cap(tmp_path):
    path = _malicious(tmp_path, *[(_info(f"d{i}", tarfile.DIRTYPE, mode=0o755), None) for i in range(20)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="more than 10 files") as info:
        archive.extract(path, str(dest), Limits(max_files=10))
    assert info.value.member == "d10" and len(os.listdir(dest)) == 10


@pytest.mark.parametrize("member", [(_info("a/newdir/f.py"), b"x"), (_info("a/newdir/sub", tarfile.DIRTYPE, mode=0o755), None)])
def test_nothing_is_created_outside_through_a_link_a_later_member_redirects(tmp_path, member):
    # 'a' -> 'b/b/../../victim' stays inside while 'b' does not exist; once 'b' -> '.', it is tmp_path/victim
    victim = tmp_path / "victim"
    victim.mkdir()
    path = _malicious(tmp_path, (_info("a", tarfile.SYMTYPE, "b/b/../../victim"), None),
                      (_info("b", tarfile.SYMTYPE, "."), None), member)
    dest = tmp_path / "stage" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeBundle):
        archive.extract(path, str(dest))
    assert os.listdir(victim) == []


@pytest.mark.parametrize("variable, value, default", [
    ("EXECUTOR_BUNDLE_MAX_BYTES", "10", 4 << 30),
    ("EXECUTOR_BUNDLE_MAX_FILES", "2", 200_000),
    ("EXECUTOR_BUNDLE_MAX_RATIO", "1.5", 200.0),
])
def test_caps_are_read_from_the_environment(tmp_path, monkeypatch, variable, value, default):
    attribute = {"EXECUTOR_BUNDLE_MAX_BYTES": "max_total_bytes", "EXECUTOR_BUNDLE_MAX_FILES": "max_files",
                 "EXECUTOR_BUNDLE_MAX_RATIO": "max_ratio"}[variable]
    monkeypatch.setenv(variable, "")
    assert getattr(Limits.from_env(), attribute) == default
    # 1 MiB that does not compress and 1 MiB that does: a ratio of about 2, in three files
    path = _malicious(tmp_path, (_info("a.bin"), os.urandom(1 << 20)), (_info("b.bin"), b"\0" * (1 << 20)), (_info("c.py"), b""))
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.extract(path, str(dest))  # the defaults let it through
    monkeypatch.setenv(variable, value)
    assert getattr(Limits.from_env(), attribute) == float(value)
    dest = tmp_path / "dest2"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match=variable):
        archive.extract(path, str(dest))


@pytest.mark.parametrize("variable, value", [
    ("EXECUTOR_BUNDLE_MAX_FILES", "lots"),
    ("EXECUTOR_BUNDLE_MAX_BYTES", "4.5e9"),
    ("EXECUTOR_BUNDLE_MAX_BYTES", "-1"),
    ("EXECUTOR_BUNDLE_MAX_RATIO", "nan"),
])
def test_bad_cap_setting_is_reported_as_a_setting(tmp_path, monkeypatch, variable, value):
    from executor.errors import TaskFailure

    monkeypatch.setenv(variable, value)
    path = _malicious(tmp_path, (_info("a.py"), b"a = 1\n"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(TaskFailure) as info:  # not "not a readable tar.gz" (a ValueError)
        archive.extract(path, str(dest))
    assert info.value.code == "TEMPLATE_INVALID" and f"{variable}={value!r}" in info.value.message
    assert os.listdir(dest) == []
