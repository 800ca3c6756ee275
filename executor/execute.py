"""One invocation, phase by phase: load, inputs, run, outputs, upload.

Every phase is timed; any exception that escapes a phase becomes a TaskFailure with that phase's
default code, and every failure ends as exactly one error document (or, if even that cannot be
written, the whole document on stderr and a non-zero exit).
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass, field

from executor import logs, storage
from executor.errors import Diagnostics, IgnoreOutputsRequested, TaskFailure, render_message
from executor.invocation import Invocation, Result
from executor.protocol import OUTPUTS_FILE, for_invocation
from executor.protocol.offload import offload_large_outputs

# A failure that escapes a phase unclassified gets this code.
PHASE_DEFAULT_CODE = {
    "bundle": "BUNDLE_FETCH",
    "load": "IMPORT",
    "inputs": "INPUT_DECODE",
    "run": "USER",
    "outputs": "OUTPUT_ENCODE",
    "upload": "OUTPUT_UPLOAD",
}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# Set by a supervised child to tell its supervisor which phase it is in: listener(event, name, ms)
phase_listener = None


@contextlib.contextmanager
def phase(name: str, diagnostics: Diagnostics, default_code: str | None = None):
    """Time a phase; anything that escapes it unclassified becomes a TaskFailure with the phase's code."""
    start = time.perf_counter()
    if phase_listener is not None:
        phase_listener("start", name, 0.0)
    try:
        yield
    except TaskFailure as failure:
        failure.phase = failure.phase or name
        raise
    except IgnoreOutputsRequested:
        raise  # not a failure: run_attempt writes nothing for it
    except storage.StorageError as e:
        code = {"upload": "OUTPUT_UPLOAD", "bundle": "BUNDLE_FETCH"}.get(name, "SYSTEM")
        failure = TaskFailure(code, str(e), cause=e)
        failure.phase = name
        raise failure from None
    except Exception as e:
        failure = TaskFailure(default_code or PHASE_DEFAULT_CODE[name], f"{type(e).__name__}: {e}", cause=e)
        failure.phase = name
        raise failure from None
    finally:
        diagnostics.phases_ms[name] = (time.perf_counter() - start) * 1000
        if phase_listener is not None:
            phase_listener("end", name, diagnostics.phases_ms[name])


def _resume_gc() -> None:
    import gc

    if not gc.isenabled():
        gc.freeze()  # what the imports built lives for the whole process: keep it out of every collection
        gc.enable()


def _read_inputs(invocation: Invocation):
    try:
        data = storage.read_bytes(invocation.inputs_uri)
    except storage.StorageNotFound:
        raise TaskFailure(
            "SYSTEM",
            f"inputs file {invocation.inputs_uri} does not exist",
            hint="the backend writes inputs.pb before starting the pod; check --inputs and the storage credentials",
            recoverable=True,
        ) from None
    return for_invocation(invocation).parse_inputs(data, invocation.inputs_uri)


@dataclass
class Attempt:
    """What one attempt came to, before anything is reported."""

    outcome: str  # "success" | "failure" | "ignored" | "test"
    task_name: str
    failure: TaskFailure | None = None
    written: list[str] = field(default_factory=list)


def prepare_bundle(invocation: Invocation, diagnostics: Diagnostics) -> None:
    if invocation.bundle is not None:
        with phase("bundle", diagnostics):
            from executor.bundle.inject import inject

            inject(invocation.bundle.uri, invocation.bundle.dest_dir, invocation.bundle.archive_md5)


def run_attempt(invocation: Invocation, diagnostics: Diagnostics) -> Attempt:
    """Load, read inputs, run, write outputs. Failures are returned, not reported."""
    task_name = " ".join(invocation.resolver_args)
    try:
        prepare_bundle(invocation, diagnostics)
        with phase("load", diagnostics):
            from executor import loader

            runnable = loader.load(invocation)
            task_name = f"{runnable.name} ({runnable.kind})"
        if phase_listener is not None:
            phase_listener("task", task_name, 0.0)
        _resume_gc()
        if invocation.test:
            logs.info("test run: task loaded, not executed", task=task_name)
            return Attempt("test", task_name)
        with runnable.session(invocation):
            with phase("inputs", diagnostics):
                prepared = runnable.decode_inputs(_read_inputs(invocation))
            with phase("run", diagnostics):
                value = runnable.call(prepared)
            with phase("outputs", diagnostics):
                files = runnable.encode_outputs(value)
                files = offload_large_outputs(files, invocation.output_prefix, runnable.output_literal_types())
        with phase("upload", diagnostics):
            written = []
            protocol = for_invocation(invocation)
            for name, message in files.items():
                uri = storage.join(invocation.output_prefix, name)
                # outputs.pb is last in `files`: it is written only once everything it points at is
                data = protocol.outputs_bytes(message) if name == OUTPUTS_FILE else message.SerializeToString()
                storage.write_bytes(uri, data)
                written.append(uri)
        return Attempt("success", task_name, written=written)
    except TaskFailure as failure:
        # The protocol's retry semantics need the exception itself, so they apply here, in the child.
        return Attempt("failure", task_name, for_invocation(invocation).classify(failure))
    except Exception as e:
        if isinstance(e, IgnoreOutputsRequested):
            logs.warning("the task raised IgnoreOutputs: no outputs are written", task=task_name)
            return Attempt("ignored", task_name)
        # a bug of ours: still explained, never a bare traceback
        return Attempt("failure", task_name, TaskFailure("SYSTEM", f"internal error in the executor: {type(e).__name__}: {e}", cause=e))


def finish(invocation: Invocation, attempt: Attempt, diagnostics: Diagnostics) -> Result:
    """Report a failure as exactly one error document, and log the summary line."""
    result = report(invocation, attempt, diagnostics)
    log_summary(result, attempt, diagnostics)
    return result


def report(invocation: Invocation, attempt: Attempt, diagnostics: Diagnostics) -> Result:
    """A failure as exactly one error document; the result either way."""
    if attempt.failure is not None:
        return report_failure(attempt.failure, invocation, attempt.task_name, diagnostics)
    return Result(attempt.outcome, 0, attempt.written)


def log_summary(result: Result, attempt: Attempt, diagnostics: Diagnostics) -> None:
    logs.info(
        "invocation finished",
        outcome=result.outcome,
        code=result.failure_code or "-",
        task=attempt.task_name,
        **{f"{k}_ms": round(v, 1) for k, v in diagnostics.phases_ms.items()},
        peak_rss_mib=round(diagnostics.peak_rss_bytes / 2**20, 1),
    )


def run_invocation(invocation: Invocation) -> Result:
    """The whole invocation in this process, without supervision (EXECUTOR_ISOLATION=none)."""
    diagnostics = Diagnostics()
    attempt = run_attempt(invocation, diagnostics)
    diagnostics.peak_rss_bytes = max(diagnostics.peak_rss_bytes, peak_rss_bytes())
    return finish(invocation, attempt, diagnostics)


def _fail_on_error() -> bool:
    return os.environ.get("FLYTE_FAIL_ON_ERROR", "").strip().lower() in ("true", "1", "yes", "on")


def report_failure(failure: TaskFailure, invocation: Invocation, task: str, diagnostics: Diagnostics) -> Result:
    diagnostics.peak_rss_bytes = diagnostics.peak_rss_bytes or peak_rss_bytes()
    protocol = for_invocation(invocation)
    message = logs.redact(render_message(failure, task, diagnostics))
    document = protocol.error_document(failure, message)
    logs.error("task failed", code=failure.code, phase=failure.phase or "-", task=task)
    sys.stderr.write(message + "\n")
    uri = storage.join(invocation.output_prefix, protocol.error_file_name())
    try:
        storage.write_bytes(uri, document.SerializeToString())
    except Exception as e:
        return _unwritable_error(document, uri, e, failure)
    return Result("failure", 1 if _fail_on_error() else 0, [uri], failure.code)


def _unwritable_error(document, uri: str, error: Exception, failure: TaskFailure) -> Result:
    """Last resort: the pod's termination message and logs must still say what happened."""
    from google.protobuf import json_format

    text = json_format.MessageToJson(document, indent=2)
    logs.error("could not write the error document; here it is in full", uri=uri, reason=str(error))
    sys.stderr.write(text + "\n")
    try:
        with open("/dev/termination-log", "w") as f:
            f.write(text[-4096:])  # Kubernetes keeps at most 4 KiB of it
    except OSError:
        pass
    return Result("failure", 1, [], failure.code)
