"""executor.bundle.tarstream against Python's tarfile (the reference) and GNU tar's own archives."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import pytest

from executor.bundle import tarstream

LONG = "pkg/" + "deep_directory_name/" * 8 + "module_with_a_long_name.py"  # > 100 chars: needs an extension


class _Forward(io.BytesIO):
    """What the Inflater offers tarstream: reads and forward seeks only."""

    def seek(self, offset, whence=0):
        assert whence == 0 and offset >= self.tell(), "tarstream must only seek forward"
        return super().seek(offset)


def _archive(fmt: int, members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _info(name, kind=tarfile.REGTYPE, size=0, linkname="", mode=0o644, mtime=0):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode, info.mtime = kind, size, linkname, mode, mtime
    return info


def _sample_members():
    return [
        (_info("pkg", tarfile.DIRTYPE, mode=0o755), None),
        (_info("pkg/__init__.py", size=3), b"x=1"),
        (_info("pkg/empty.txt"), b""),
        (_info("pkg/exec.sh", size=600, mode=0o755, mtime=315532800.0), b"e" * 600),  # float mtime: pax
        (_info(LONG, size=5), b"hello"),
        (_info("pkg/link", tarfile.SYMTYPE, linkname="__init__.py"), None),
        (_info("pkg/hard", tarfile.LNKTYPE, linkname="pkg/__init__.py"), None),
        (_info("pkg/long_link", tarfile.SYMTYPE, linkname="../" + LONG), None),
        (_info("pkg/ünïcode_名前.py", size=1), b"u"),
        (_info("pkg/dev", tarfile.CHRTYPE), None),
        (_info("pkg/fifo", tarfile.FIFOTYPE), None),
        (_info("pkg/setuid", size=1, mode=0o4755), b"s"),
        (_info("pkg/big_block_edge", size=1024), b"b" * 1024),
    ]


def _reference(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, m.mode, m.size, m.type, m.linkname, m.offset_data, m.issparse()) for m in tar]


def _ours(data: bytes) -> list[tuple]:
    return [(m.name, m.mode, m.size, bytes([m.type]), m.linkname, m.offset_data, m.issparse())
            for m in tarstream.members(_Forward(data))]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT], ids=["pax", "gnu", "ustar"])
def test_members_match_tarfile(fmt):
    members = _sample_members()
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the long link target or non-ASCII names beyond its fields
        members = [(i, d) for i, d in members if i.name != "pkg/long_link"]
    data = _archive(fmt, members)
    ours = _ours(data)
    assert ours == _reference(data)
    assert LONG in [m[0] for m in ours]


def test_member_data_is_read_between_headers_and_skipped_when_not():
    data = _archive(tarfile.PAX_FORMAT, _sample_members())
    stream = _Forward(data)
    seen = {}
    for member in tarstream.members(stream):
        if member.isreg() and member.name.endswith(".py"):
            stream.seek(member.offset_data)
            seen[member.name] = stream.read(member.size)
    assert seen == {"pkg/__init__.py": b"x=1", LONG: b"hello", "pkg/ünïcode_名前.py": b"u"}


def test_global_pax_header_and_pax_size_override():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tar:
        info = _info("a.txt", size=3)
        info.pax_headers = {"path": "renamed/by/pax.txt"}
        tar.addfile(info, io.BytesIO(b"abc"))
        tar.addfile(_info("b.txt", size=2), io.BytesIO(b"de"))
    data = out.getvalue()
    assert _ours(data) == _reference(data)
    assert [m[0] for m in _ours(data)] == ["renamed/by/pax.txt", "b.txt"]


def test_only_the_pax_keywords_extraction_uses_are_kept():
    # A global header of many keywords would otherwise be applied to every member (CPU) and kept (memory).
    records = b"".join(_pax_record(f"junk{i}", "v") for i in range(1000))
    records += _pax_record("path", "a/b.py") + _pax_record("GNU.sparse.major", "1") + _pax_record("GNU.sparse.minor", "0")
    assert tarstream._pax_records(records, len(records)) == {"path": "a/b.py", "GNU.sparse.": ""}


def _pax_record(keyword: str, value: str) -> bytes:
    body = f" {keyword}={value}\n".encode()
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return str(length).encode() + body


def test_pax_sparse_keys_mark_the_member_sparse():
    info = _info("sparse.bin", size=4)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse.bin",
                        "GNU.sparse.realsize": "4"}
    data = _archive(tarfile.PAX_FORMAT, [(info, b"abcd")])
    (member,) = list(tarstream.members(_Forward(data)))
    assert member.issparse()


def test_base256_size_is_read():
    header = bytearray(_archive(tarfile.GNU_FORMAT, [(_info("f", size=3), b"abc")])[:512])
    header[124:136] = b"\x80" + (3).to_bytes(11, "big")  # GNU base-256 encoding of 3
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data = bytes(header) + b"abc".ljust(512, b"\0") + b"\0" * 1024
    (member,) = list(tarstream.members(_Forward(data)))
    assert (member.name, member.size) == ("f", 3)


def test_archive_without_end_marker_ends_at_the_last_member():
    data = _archive(tarfile.PAX_FORMAT, [(_info("a", size=1), b"a")])
    cut = data[:512 * 4]  # pax header + its data + member header + member data, no zero blocks
    assert [m.name for m in tarstream.members(_Forward(cut))] == ["a"]


def test_empty_archive_has_no_members():
    assert list(tarstream.members(_Forward(b"\0" * 10240))) == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:512 * 4] + bytes([d[512 * 4] ^ 0xFF]) + d[512 * 4 + 1:], "checksum"),  # second member's pax header
    (lambda d: d[:512 * 5 + 100], "truncated header"),
    (lambda d: b"", "empty file"),
    (lambda d: d[:1024] + b"\0" * 1024, "archive ends after an extended header"),  # a pax header, then the end
])
def test_damaged_headers_are_errors_not_a_shorter_archive(damage, message):
    data = _archive(tarfile.PAX_FORMAT, [(_info("a", size=1, mtime=1.5), b"a"), (_info("b", size=1, mtime=1.5), b"b")])
    with pytest.raises(tarstream.TarError, match=message):
        list(tarstream.members(_Forward(damage(data))))


def test_gnu_tar_archive_matches_tarfile(tmp_path):
    if shutil.which("tar") is None:
        pytest.fail("GNU tar is needed for this test (install the tar package)")
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print(1)\n")
    (src / LONG.replace("pkg/", "pkg/sub/")).parent.mkdir(parents=True)
    (src / LONG.replace("pkg/", "pkg/sub/")).write_text("long\n")
    (src / "pkg" / "link").symlink_to("a.py")
    for fmt in ("gnu", "posix", "oldgnu"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), "pkg"], check=True)
        data = out.read_bytes()
        assert _ours(data) == _reference(data), fmt


@pytest.mark.parametrize("kind", [b"x", b"L"])
def test_oversized_extended_header_is_refused_before_it_is_read(kind):
    """A pax or long-name header claiming gigabytes would otherwise be read into memory whole."""
    header = bytearray(512)
    header[0:9] = b"././@Long"
    header[100:108] = b"0000644\0"
    header[124:136] = b"%011o\0" % (4 << 30)
    header[156:157] = kind
    header[257:263] = b"ustar\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(tarstream.TarError, match="extended header of 4294967296 bytes"):
        list(tarstream.members(_Forward(bytes(header) + b"\0" * 4096)))
