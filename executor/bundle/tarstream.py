"""Tar members read from a forward-only stream: the part of `tarfile` that extraction needs.

A bundle holds thousands of small files, each behind one or two 512-byte headers (flytekit and
Python's tarfile write a pax header before every member, for its float mtime), and tarfile spends
about 40 µs parsing each pair in the thread that also hashes and hands data to the writers. This
reads the same formats (ustar, GNU long names and links, pax per-member and global headers) with the
same results as `tarfile.TarFile` does, for a fraction of that. It is stricter in one way: a header
that is truncated or fails its checksum is an error wherever it appears (tarfile quietly ends the
archive there, so a damaged bundle would extract as a shorter one).

Only headers are read here; the caller reads a member's data itself, from `offset_data`.
"""
from __future__ import annotations

import re

BLOCK = 512
# tarfile's SUPPORTED_TYPES: the data of any other type is skipped, as tarfile skips it
_SUPPORTED = frozenset(b"01234567\x00LKS")
_REGULAR = frozenset(b"0\x007S")
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
# A pax or GNU long-name header's data is read into memory whole: a long path is a few KiB, a
# header claiming gigabytes is an attack on the reader's memory.
MAX_EXTENDED_BYTES = 1 << 20


class TarError(ValueError):
    """The stream is not a readable tar archive."""


class Member:
    __slots__ = ("name", "mode", "size", "type", "linkname", "offset_data", "sparse", "extended_bytes")

    def __init__(self, name: str, mode: int, size: int, type_: int, linkname: str):
        self.name = name
        self.mode = mode
        self.size = size
        self.type = type_  # the typeflag byte, as an int (ord("0") for a regular file)
        self.linkname = linkname
        self.offset_data = 0
        self.sparse = type_ == 0x53  # "S": old GNU sparse; pax GNU.sparse.* keys set it too
        self.extended_bytes = 0  # of the long-name and pax headers read before it (they expand too)

    def isreg(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == 0x35  # "5"

    def issym(self) -> bool:
        return self.type == 0x32  # "2"

    def islnk(self) -> bool:
        return self.type == 0x31  # "1"

    def ischr(self) -> bool:
        return self.type == 0x33  # "3"

    def isblk(self) -> bool:
        return self.type == 0x34  # "4"

    def isfifo(self) -> bool:
        return self.type == 0x36  # "6"

    def issparse(self) -> bool:
        return self.sparse

    def _skips_data(self) -> bool:
        return self.type in _REGULAR or self.type not in _SUPPORTED


def members(stream):
    """Yield each member of the tar archive read from `stream` (read(n), tell(), forward seek()).

    The caller may read a member's data (from member.offset_data) before asking for the next one;
    the stream is moved on past it either way.
    """
    global_pax: dict[str, str] = {}
    next_header = 0
    while True:
        if stream.tell() != next_header:
            stream.seek(next_header)
        member = _read_member(stream, global_pax, first=next_header == 0)
        if member is None:
            return
        next_header = member.offset_data + (_blocks(member.size) if member._skips_data() else 0)
        yield member


def _read_member(stream, global_pax: dict[str, str], first: bool) -> Member | None:
    """The next member, with the long names and pax headers before it applied; None at the end."""
    long_name = long_link = None
    pax: dict[str, str] | None = None
    extended = 0
    while True:
        buf = stream.read(BLOCK)
        if len(buf) < BLOCK:
            if not buf and not first and long_name is None and long_link is None and pax is None:
                return None  # no end-of-archive blocks: tarfile accepts that too
            raise TarError("empty file" if first and not buf else "truncated header")
        if buf.count(0) == BLOCK:  # the end-of-archive marker
            if long_name is not None or long_link is not None or pax is not None:
                raise TarError("archive ends after an extended header")
            return None
        member = _parse_header(buf)
        first = False
        kind = member.type
        if kind in (0x4C, 0x4B, 0x78, 0x58, 0x67) and member.size > MAX_EXTENDED_BYTES:
            raise TarError(f"extended header of {member.size} bytes (more than {MAX_EXTENDED_BYTES})")
        if kind in (0x4C, 0x4B, 0x78, 0x58, 0x67):
            extended += member.size
        if kind in (0x4C, 0x4B):  # "L", "K": GNU long name or link target in the data blocks
            data = _nts(stream.read(_blocks(member.size)))
            if kind == 0x4C:
                long_name = data
            else:
                long_link = data
            continue
        if kind in (0x78, 0x58, 0x67):  # "x", "X": pax header for the next member; "g": global
            records = _pax_records(stream.read(_blocks(member.size)), member.size)
            if kind == 0x67:
                global_pax.update(records)
            else:
                pax = {**(pax or {}), **records}
            continue
        member.offset_data = stream.tell()
        member.extended_bytes = extended
        if long_name is not None:
            member.name = long_name.rstrip("/") if member.isdir() else long_name
        if long_link is not None:
            member.linkname = long_link
        for headers in (global_pax, pax):
            if headers:
                _apply_pax(member, headers)
        return member


def _parse_header(buf: bytes) -> Member:
    checksum = _number(buf[148:156])
    unsigned = sum(buf) - sum(buf[148:156]) + 256  # the checksum field counts as 8 spaces
    if checksum != unsigned and checksum != _signed_sum(buf):
        raise TarError("bad header checksum")
    type_ = buf[156]
    name = _nts(buf[0:100])
    if type_ == 0 and name.endswith("/"):  # old V7 tar: a directory is a file with a trailing slash
        type_ = 0x35
    if type_ == 0x35:
        name = name.rstrip("/")
    prefix = _nts(buf[345:500])
    if prefix and type_ not in (0x4C, 0x4B, 0x53):  # ustar splits long names; GNU uses the field otherwise
        name = prefix + "/" + name
    size = _number(buf[124:136])
    if size < 0:
        raise TarError(f"negative size in the header of {name!r}")
    return Member(name, _number(buf[100:108]), size, type_, _nts(buf[157:257]))


def _signed_sum(buf: bytes) -> int:
    return 256 + sum(b - 256 if b > 127 else b for i, b in enumerate(buf) if not 148 <= i < 156)


def _apply_pax(member: Member, headers: dict[str, str]) -> None:
    for keyword, value in headers.items():
        if keyword == "path":
            member.name = value.rstrip("/")
        elif keyword == "linkpath":
            member.linkname = value
        elif keyword == "size":
            try:
                member.size = int(value)
            except ValueError:
                member.size = 0  # as tarfile
        elif keyword.startswith("GNU.sparse."):
            member.sparse = True


_PAX_USED = ("path", "linkpath", "size")  # and GNU.sparse.*, kept as one key: nothing else is read


def _pax_records(buf: bytes, size: int) -> dict[str, str]:
    """`<length> <keyword>=<value>\\n` records, as tarfile reads them (UTF-8, undecodable bytes kept).
    Only the keywords extraction uses are kept: a global header of many others would otherwise be
    applied to every member."""
    records = {}
    pos = 0
    buf = buf[:size]
    while match := _PAX_RECORD.match(buf, pos):
        length = int(match.group(1))
        if length == 0:
            raise TarError("invalid pax header")
        keyword = match.group(2).decode("utf-8", "surrogateescape")
        if keyword.startswith("GNU.sparse."):
            records["GNU.sparse."] = ""
        elif keyword in _PAX_USED:
            value = buf[match.end(2) + 1: match.start(1) + length - 1]
            records[keyword] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _blocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _nts(field: bytes) -> str:
    end = field.find(0)
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):  # GNU base-256, for values too big for octal
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    end = field.find(0)
    digits = (field if end < 0 else field[:end]).strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError("invalid number in a header") from None
