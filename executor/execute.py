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

from executor import logs, storage
from executor.errors import Diagnostics, TaskFailure, render_message
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


@contextlib.contextmanager
def _phase(name: str, diagnostics: Diagnostics):
    start = time.perf_counter()
    try:
        yield
    except TaskFailure as failure:
        failure.phase = failure.phase or name
        raise
    except storage.StorageError as e:
        code = {"upload": "OUTPUT_UPLOAD", "bundle": "BUNDLE_FETCH"}.get(name, "SYSTEM")
        failure = TaskFailure(code, str(e), cause=e)
        failure.phase = name
        raise failure from None
    except Exception as e:
        failure = TaskFailure(PHASE_DEFAULT_CODE[name], f"{type(e).__name__}: {e}", cause=e)
        failure.phase = name
        raise failure from None
    finally:
        diagnostics.phases_ms[name] = (time.perf_counter() - start) * 1000


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


def run_invocation(invocation: Invocation) -> Result:
    diagnostics = Diagnostics()
    task_name = " ".join(invocation.resolver_args)
    result: Result
    try:
        if invocation.bundle is not None:
            with _phase("bundle", diagnostics):
                from executor.bundle.inject import inject

                inject(invocation.bundle.uri, invocation.bundle.dest_dir, invocation.bundle.archive_md5)
        with _phase("load", diagnostics):
            from executor import loader

            runnable = loader.load(invocation)
            task_name = f"{runnable.name} ({runnable.kind})"
        _resume_gc()
        if invocation.test:
            logs.info("test run: task loaded, not executed", task=task_name)
            return Result("test", 0)
        with runnable.session(invocation):
            with _phase("inputs", diagnostics):
                prepared = runnable.decode_inputs(_read_inputs(invocation))
            with _phase("run", diagnostics):
                value = runnable.call(prepared)
            with _phase("outputs", diagnostics):
                files = runnable.encode_outputs(value)
                files = offload_large_outputs(files, invocation.output_prefix, runnable.output_literal_types())
        with _phase("upload", diagnostics):
            written = []
            protocol = for_invocation(invocation)
            for name, message in files.items():
                uri = storage.join(invocation.output_prefix, name)
                # outputs.pb is last in `files`: it is written only once everything it points at is
                data = protocol.outputs_bytes(message) if name == OUTPUTS_FILE else message.SerializeToString()
                storage.write_bytes(uri, data)
                written.append(uri)
        result = Result("success", 0, written)
    except TaskFailure as failure:
        result = _report_failure(failure, invocation, task_name, diagnostics)
    except Exception as e:
        if type(e).__name__ == "IgnoreOutputsRequested":
            logs.warning("the task raised IgnoreOutputs: no outputs are written", task=task_name)
            result = Result("ignored", 0)
        else:  # a bug of ours: still explained, never a bare traceback
            failure = TaskFailure("SYSTEM", f"internal error in the executor: {type(e).__name__}: {e}", cause=e)
            result = _report_failure(failure, invocation, task_name, diagnostics)
    diagnostics.peak_rss_bytes = peak_rss_bytes()
    logs.info(
        "invocation finished",
        outcome=result.outcome,
        code=result.failure_code or "-",
        task=task_name,
        **{f"{k}_ms": round(v, 1) for k, v in diagnostics.phases_ms.items()},
        peak_rss_mib=round(diagnostics.peak_rss_bytes / 2**20, 1),
    )
    return result


def _fail_on_error() -> bool:
    return os.environ.get("FLYTE_FAIL_ON_ERROR", "").strip().lower() in ("true", "1", "yes", "on")


def _report_failure(failure: TaskFailure, invocation: Invocation, task: str, diagnostics: Diagnostics) -> Result:
    diagnostics.peak_rss_bytes = peak_rss_bytes()
    protocol = for_invocation(invocation)
    failure = protocol.classify(failure)
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
