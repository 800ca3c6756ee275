"""Which files of a source directory a code bundle leaves out, exactly as flytekit's fast_package
does (its default IgnoreGroup): what git ignores, .dockerignore and .flyteignore patterns (Docker's
rules), and flytekit's standard patterns. Used by `executor bundle build` only.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess

# flytekit's StandardIgnore patterns, matched with fnmatch against the whole relative path (so `*`
# spans `/`, and only a top-level .cache is meant).
STANDARD_IGNORE = ("*.pyc", ".cache", ".cache/*", "__pycache__/*", "**/__pycache__/*")


class Ignores:
    """Which files flytekit 1.16's fast_package (copy_style ALL) leaves out of a bundle: its default
    IgnoreGroup of GitIgnore, DockerIgnore, StandardIgnore and FlyteIgnore. A file (its path relative
    to the source, as os.walk finds it) is left out when any of them ignores it."""

    def __init__(self, source: str):
        self.git = _git_ignored(source)
        self.docker = _PatternMatcher.from_file(os.path.join(source, ".dockerignore"))
        self.flyte = _PatternMatcher.from_file(os.path.join(source, ".flyteignore"))

    def __call__(self, rel: str) -> bool:
        return (rel in self.git or self.docker.matches(rel)
                or any(fnmatch.fnmatch(rel, pattern) for pattern in STANDARD_IGNORE) or self.flyte.matches(rel))


def _git_ignored(source: str) -> frozenset[str]:
    """flytekit's GitIgnore: the untracked files git ignores (.gitignore at any level, .git/info/exclude,
    core.excludesFile), listed by the same command in the same way. Tracked files stay in whatever
    .gitignore says. No git on PATH, or git failing (not a repository, say): nothing ignored. Paths
    are taken as git prints them, newline-separated and quoted when unusual (core.quotePath), so,
    as in flytekit, an ignored file with a non-ASCII name stays in."""
    if shutil.which("git") is None:
        return frozenset()
    out = subprocess.run(["git", "ls-files", "-io", "--exclude-standard"], cwd=source, capture_output=True)
    if out.returncode != 0:
        return frozenset()
    # flytekit decodes strictly (a non-UTF-8 name, printed raw under core.quotePath=false, fails it):
    # surrogateescape names such a file as os.walk does instead.
    return frozenset(out.stdout.decode("utf-8", "surrogateescape").split("\n")[:-1])


class _PatternMatcher:
    """docker-py's PatternMatcher (docker.utils.build), which flytekit's DockerIgnore and
    FlyteIgnore use: Docker's .dockerignore rules. Case-insensitive; `*` and `?` stay within one path
    component, `**` spans any number; leading/trailing `/`, `.` components and `..` (with the one before
    it) dropped; the last matching pattern decides, `!` re-includes; a pattern also matches a file
    when it matches the file's first directories (`docs` leaves out `docs/a/b`). `.dockerignore`
    itself is always kept (a final `!.dockerignore`)."""

    __slots__ = ("patterns",)

    def __init__(self, lines: list[str]):
        self.patterns = []
        for line in [*lines, "!.dockerignore"]:
            exclusion = line.startswith("!")
            dirs = _split_pattern(line[1:] if exclusion else line)
            if dirs:  # blank lines and "." are no patterns
                self.patterns.append((exclusion, len(dirs), re.compile(_translate("/".join(dirs).lower()))))

    @classmethod
    def from_file(cls, path: str) -> "_PatternMatcher":
        lines = []
        if os.path.isfile(path):
            with open(path) as f:
                # exactly flytekit's reading: only lines starting with '#' are comments; blank lines
                # give empty patterns, which the matcher drops
                lines = [line.strip() for line in f.readlines() if line and not line.startswith("#")]
        return cls(lines)

    def matches(self, rel: str) -> bool:
        name = rel.lower()
        parent = os.path.dirname(rel)
        parent_dirs = [p for p in parent.split("/") if p and p != "."]
        matched = False
        for exclusion, depth, regex in self.patterns:
            match = regex.match(name) is not None
            if not match and parent and depth <= len(parent_dirs):
                match = regex.match("/".join(parent_dirs[:depth]).lower()) is not None
            if match:
                matched = not exclusion
        return matched


def _split_pattern(pattern: str) -> list[str]:
    split = [p for p in pattern.strip().split("/") if p and p != "."]
    i = 0
    while i < len(split):
        if split[i] == "..":
            del split[i]
            if i > 0:
                del split[i - 1]
                i -= 1
        else:
            i += 1
    return split


def _translate(pat: str) -> str:
    """docker.utils.fnmatch.translate: a .dockerignore pattern as a regular expression."""
    i, n = 0, len(pat)
    res = "^"
    while i < n:
        c = pat[i]
        i += 1
        if c == "*":
            if i < n and pat[i] == "*":
                i += 1
                if i < n and pat[i] == "/":  # "**/" is "**"
                    i += 1
                res += ".*" if i >= n else "(.*/)?"
            else:
                res += "[^/]*"
        elif c == "?":
            res += "[^/]"
        elif c == "[":
            j = i
            if j < n and pat[j] == "!":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            while j < n and pat[j] != "]":
                j += 1
            if j >= n:
                res += "\\["
            else:
                stuff = pat[i:j].replace("\\", "\\\\")
                i = j + 1
                if stuff[0] == "!":
                    stuff = "^" + stuff[1:]
                elif stuff[0] == "^":
                    stuff = "\\" + stuff
                res += f"[{stuff}]"
        else:
            res += re.escape(c)
    return res + "$"
