"""The failure taxonomy: every way an invocation can fail, and how each maps to a ContainerError.

Each code has a fixed origin (who is to blame) and kind (whether the backend should retry).
The one exception is USER: a user exception that subclasses flytekit's FlyteRecoverableException
is RECOVERABLE, as under flytekit's own entrypoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import IntEnum


class Origin(IntEnum):
    """ExecutionError.ErrorKind in flyteidl."""

    UNKNOWN = 0
    USER = 1
    SYSTEM = 2


class Kind(IntEnum):
    """ContainerError.Kind in flyteidl."""

    NON_RECOVERABLE = 0
    RECOVERABLE = 1


@dataclass(frozen=True)
class FailureClass:
    code: str
    origin: Origin
    kind: Kind
    meaning: str


_CLASSES = [
    FailureClass("BUNDLE_FETCH", Origin.SYSTEM, Kind.RECOVERABLE, "the code bundle could not be downloaded"),
    FailureClass("BUNDLE_INTEGRITY", Origin.SYSTEM, Kind.NON_RECOVERABLE, "the code bundle does not match its digest"),
    FailureClass("BUNDLE_UNSAFE", Origin.USER, Kind.NON_RECOVERABLE, "the code bundle contains a member that is refused"),
    FailureClass("TEMPLATE_INVALID", Origin.SYSTEM, Kind.NON_RECOVERABLE, "the TaskTemplate or runtime settings are unusable"),
    FailureClass("SECRET_MISSING", Origin.USER, Kind.NON_RECOVERABLE, "a secret the task requests is not available"),
    FailureClass("IMPORT", Origin.USER, Kind.NON_RECOVERABLE, "the task could not be imported"),
    FailureClass("INPUT_DECODE", Origin.SYSTEM, Kind.NON_RECOVERABLE, "the inputs do not fit the task's signature"),
    FailureClass("USER", Origin.USER, Kind.NON_RECOVERABLE, "the task raised an exception"),
    FailureClass("TIMEOUT", Origin.USER, Kind.RECOVERABLE, "the task ran past its timeout"),
    FailureClass("OOM", Origin.USER, Kind.RECOVERABLE, "the task ran out of memory"),
    FailureClass("PREEMPTED", Origin.SYSTEM, Kind.RECOVERABLE, "the pod was asked to stop (SIGTERM)"),
    FailureClass("OUTPUT_ENCODE", Origin.USER, Kind.NON_RECOVERABLE, "the task's return value does not fit its annotation"),
    FailureClass("OUTPUT_UPLOAD", Origin.SYSTEM, Kind.RECOVERABLE, "the outputs could not be written"),
    FailureClass("SYSTEM", Origin.SYSTEM, Kind.RECOVERABLE, "the executor or the storage failed"),
]
TAXONOMY: dict[str, FailureClass] = {c.code: c for c in _CLASSES}


class IgnoreOutputsRequested(Exception):
    """The task raised flytekit's IgnoreOutputs: write nothing (distributed training workers)."""


class TaskFailure(Exception):
    """A classified failure. Raised anywhere in the pipeline; turned into exactly one error document."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        cause: BaseException | None = None,
        hint: str | None = None,
        recoverable: bool | None = None,
    ):
        if code not in TAXONOMY:
            raise ValueError(f"unknown failure code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.cause = cause
        self.hint = hint
        self._recoverable = recoverable
        self.phase: str | None = None  # filled in by the pipeline
        self.traceback_text: str | None = None  # set when the failure crossed a process boundary

    @property
    def failure_class(self) -> FailureClass:
        return TAXONOMY[self.code]

    @property
    def origin(self) -> Origin:
        return self.failure_class.origin

    @property
    def kind(self) -> Kind:
        if self._recoverable is not None:
            return Kind.RECOVERABLE if self._recoverable else Kind.NON_RECOVERABLE
        return self.failure_class.kind

    def user_traceback(self) -> str:
        if self.traceback_text is not None:
            return self.traceback_text
        return format_user_traceback(self.cause) if self.cause is not None else ""

    def to_dict(self) -> dict:
        """For a supervised child to hand its failure to the supervisor (the traceback rendered here)."""
        return {
            "code": self.code, "message": self.message, "hint": self.hint, "phase": self.phase,
            "recoverable": self._recoverable, "traceback": self.user_traceback() if _traceback_helps(self) else "",
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TaskFailure":
        failure = cls(data["code"], data["message"], hint=data.get("hint"), recoverable=data.get("recoverable"))
        failure.phase = data.get("phase")
        failure.traceback_text = data.get("traceback") or ""
        return failure


def memory_limit_text() -> str:
    """The limit the task ran into: the cgroup's memory.max and/or RLIMIT_AS."""
    import resource

    limits = []
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            value = f.read().strip()
        if value != "max":
            limits.append(f"cgroup memory.max {int(value) / 2**20:.0f} MiB")
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(f"RLIMIT_AS {soft / 2**20:.0f} MiB")
    return ", ".join(limits) or "no explicit limit seen (node memory)"


def out_of_memory(exc: BaseException) -> "TaskFailure":
    return TaskFailure(
        "OOM", f"the task ran out of memory (MemoryError; limit: {memory_limit_text()})", cause=exc,
        hint="raise the task's memory limit, or process the data in smaller pieces",
    )


def is_marked_recoverable(exc: BaseException) -> bool:
    """True for subclasses of flytekit's FlyteRecoverableException, checked by name so no SDK is needed."""
    return any(cls.__name__ in ("FlyteRecoverableException", "_Recoverable") for cls in type(exc).__mro__)


_EXECUTOR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep
_HIDDEN_MARKERS = (
    _EXECUTOR_DIR,
    f"{os.sep}flytekit{os.sep}",
    f"{os.sep}flyte{os.sep}_",  # flyte 2's private modules: _task.py, _utils/, _internal/, _context.py
    "<frozen importlib",
    f"{os.sep}importlib{os.sep}__init__.py",
)


def _is_user_frame(filename: str) -> bool:
    # The standard library's frames (importlib, asyncio, concurrent.futures) are plumbing, not the user's;
    # third-party packages in site-packages stay: the user called them.
    if filename.startswith(_STDLIB_DIR) and "site-packages" not in filename:
        return False
    if filename.endswith(f"{os.sep}bin{os.sep}executor"):  # the console-script shim
        return False
    return not any(marker in filename for marker in _HIDDEN_MARKERS)


def format_user_traceback(exc: BaseException) -> str:
    """The traceback of `exc` (and its causes) with the executor's and the SDK's own frames removed."""
    import traceback

    parts: list[str] = []
    seen: set[int] = set()
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        nxt = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        current = nxt
    for depth, item in enumerate(reversed(chain)):
        frames = [f for f in traceback.extract_tb(item.__traceback__) if _is_user_frame(f.filename)]
        if depth:
            parts.append("\nThe above exception was the direct cause of the following exception:\n\n")
        if frames:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.StackSummary.from_list(frames).format())
        parts.extend(traceback.format_exception_only(type(item), item))
    return "".join(parts)


def format_stack_dump(dump: str) -> str:
    """A faulthandler all-threads dump, keeping only the user's frames (and threads that have some)."""
    out: list[str] = []
    header = None
    for line in dump.splitlines():
        stripped = line.strip()
        if stripped.startswith(("Thread 0x", "Current thread 0x")):
            header = line
            continue
        if stripped.startswith('File "'):
            filename = stripped[6:].split('"', 1)[0]
            if _is_user_frame(filename):
                if header is not None:
                    out.append(header.replace("(most recent call first)", "(most recent call first, user frames)"))
                    header = None
                out.append(line)
    return "\n".join(out)


@dataclass
class Diagnostics:
    """Per-phase timings (ms) and resource use, attached to every summary line and error document."""

    phases_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0

    def timings_text(self) -> str:
        phases = " · ".join(f"{name} {ms:.1f} ms" for name, ms in self.phases_ms.items())
        return f"{phases or 'no phase completed'} · peak RSS {self.peak_rss_bytes / 2**20:.1f} MiB"


def _traceback_helps(failure: TaskFailure) -> bool:
    """Storage and bundle failures are explained by their message; their frames are library plumbing."""
    if failure.code in ("BUNDLE_FETCH", "BUNDLE_INTEGRITY", "BUNDLE_UNSAFE", "OUTPUT_UPLOAD", "SECRET_MISSING"):
        return False
    return not getattr(failure.cause, "explains_itself", False)


def render_message(failure: TaskFailure, task: str, diagnostics: Diagnostics) -> str:
    """The text a person reads in the Flyte console: what failed, where, why, and what to do."""
    attempt = os.environ.get("FLYTE_ATTEMPT_NUMBER", "0")
    lines = [
        f"{failure.code}: {failure.message}",
        f"  task: {task} · phase: {failure.phase or 'unknown'} · attempt: {attempt}"
        f" · {failure.origin.name.lower()} error, {failure.kind.name.lower().replace('_', '-')}",
    ]
    if failure.hint:
        lines.append(f"  hint: {failure.hint}")
    lines.append(f"  timings: {diagnostics.timings_text()}")
    trace = failure.user_traceback() if _traceback_helps(failure) else ""
    if trace:
        lines.extend(["", trace.rstrip("\n")])
    return "\n".join(lines)
