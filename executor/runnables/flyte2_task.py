"""A flyte 2 task, run through the flyte SDK's own task context, controller and type engine.

What a0 does for one action (flyte/_bin/runtime.py and flyte/_internal/runtime/taskrunner.py),
split into our phases so that each is timed and its failures classified:
    session         init_in_cluster, the remote controller (sub-actions), one event loop for all phases
    decode_inputs   TaskContext for the action, then the SDK's convert_inputs_to_native
    call            task.execute(**inputs) (async tasks on the loop, sync ones in a thread, as flyte does),
                    with the controller's error watch beside it; the report is flushed after
    encode_outputs  the SDK's convert_from_native_to_outputs -> a flyteidl2 Outputs, as a0 writes it
Imported only when the loaded object is a flyte 2 task.
"""
from __future__ import annotations

import contextlib
import inspect

from executor.errors import TaskFailure
from executor.invocation import Invocation
from executor.protocol import OUTPUTS_FILE


def load_with_resolver(resolver: str, args: tuple[str, ...]):
    """A resolver other than flyte's default: flyte's own load_task, as a0 would call it."""
    try:
        from flyte._internal.runtime.entrypoints import load_task

        return load_task(resolver, *args)
    except Exception as e:
        raise TaskFailure("IMPORT", f"resolver {resolver} could not load {list(args)}: {type(e).__name__}: {e}",
                          cause=e) from None


def _start_time(text: str | None):
    """a0's rule: RFC 3339 (a trailing Z allowed), UTC; unset or unparsable means the epoch."""
    from datetime import datetime, timezone

    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    if not text:
        return epoch
    raw = text.strip()
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return epoch
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


class Flyte2Task:
    kind = "flyte 2 task"

    def __init__(self, task, name: str, invocation: Invocation):
        self.task = task
        self.name = getattr(task, "name", None) or name
        self.invocation = invocation
        self._loop = None
        self._controller = None
        self._stack: contextlib.ExitStack | None = None
        self._inputs = None
        self._tctx = None

    # --- session ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self, invocation: Invocation):
        import asyncio

        import flyte.errors
        from flyte._initialize import init_in_cluster
        from flyte._internal.controllers import create_controller

        spec = invocation.flyte2
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(flyte.errors.silence_polling_error)
        try:
            kwargs = init_in_cluster(org=spec.org, project=spec.project, domain=spec.domain)
            self._controller = create_controller(ct="remote", **kwargs)
        except Exception as e:
            raise TaskFailure("SYSTEM", f"the flyte runtime could not start: {type(e).__name__}: {e}", cause=e) from None
        with contextlib.ExitStack() as stack:
            self._stack = stack
            try:
                yield self
            finally:
                try:
                    self._loop.run_until_complete(self._controller.stop())
                except Exception:
                    pass
                self._stack = None
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()
        asyncio.set_event_loop(None)

    def _task_context(self, custom_context: dict):
        import flyte.report
        from flyte._internal.image_cache import ImageCache
        from flyte.models import ActionID, CheckpointPaths, CodeBundle, RawDataPath, TaskContext

        inv, spec = self.invocation, self.invocation.flyte2
        action = ActionID(name=spec.action_name, run_name=spec.run_name, project=spec.project, domain=spec.domain,
                          org=spec.org)
        bundle = None
        if inv.bundle is not None or spec.pkl_uri:
            bundle = CodeBundle(tgz=inv.bundle.uri if inv.bundle else None, pkl=spec.pkl_uri,
                                destination=spec.dest_dir or ".", computed_version=spec.version)
        return TaskContext(
            action=action,
            checkpoint_paths=CheckpointPaths(prev_checkpoint_path=inv.prev_checkpoint, checkpoint_path=inv.checkpoint_path),
            code_bundle=bundle,
            input_path=inv.inputs_uri,
            output_path=inv.output_prefix,
            run_base_dir=spec.run_base_dir,
            version=spec.version,
            raw_data_path=RawDataPath(path=inv.raw_output_prefix_or_default),
            compiled_image_cache=ImageCache.from_transport(spec.image_cache) if spec.image_cache else None,
            report=flyte.report.Report(name=action.name),
            mode="remote",
            interactive_mode=spec.interactive,
            custom_context=custom_context,
            run_start_time=_start_time(spec.run_start_time),
        )

    # --- phases -------------------------------------------------------------------------------

    def decode_inputs(self, literal_map):
        from flyte._context import internal_ctx
        from flyte._internal.runtime.convert import Inputs, convert_inputs_to_native

        from executor.protocol.flyte2 import inputs_message

        self._inputs = Inputs(proto_inputs=inputs_message(literal_map))
        self._tctx = self._task_context(self._inputs.context)
        self._stack.enter_context(internal_ctx().replace_task_context(self._tctx))
        interface = self.task.native_interface
        given = {named.name for named in self._inputs.proto_inputs.literals}
        missing = [n for n, (_, default) in interface.inputs.items() if n not in given and default is inspect.Parameter.empty]
        if missing:
            kickoff = {kv.value for kv in self._inputs.proto_inputs.context if kv.key == "_u_kickoff_time_input_arg"}
            missing = [n for n in missing if n not in kickoff]
        if missing:
            raise TaskFailure(
                "INPUT_DECODE",
                f"inputs.pb has no value for {', '.join(map(repr, missing))}, required by {self.name}",
                hint=f"inputs.pb holds {sorted(given) or 'nothing'}; was the task re-deployed with a new signature?",
            )
        try:
            return self._loop.run_until_complete(convert_inputs_to_native(self._inputs, interface))
        except Exception as e:
            raise TaskFailure("INPUT_DECODE", f"inputs could not be converted: {type(e).__name__}: {e}", cause=e) from None

    def call(self, kwargs: dict):
        import asyncio

        async def execute():
            try:
                return await self.task.execute(**kwargs)
            finally:
                await self._controller.finalize_parent_action(self._tctx.action)

        async def with_watch():
            # As a0's run_coros: the controller's error watch beside the task; the first to end wins.
            work = asyncio.ensure_future(execute())
            watch = asyncio.ensure_future(self._controller.watch_for_errors())
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                watch.result()  # the watch ended first: its error is the failure
                raise RuntimeError("the flyte controller stopped before the task finished")
            watch.cancel()
            return work.result()

        try:
            out = self._loop.run_until_complete(with_watch())
        except SystemExit as e:
            raise TaskFailure("USER", f"the task called sys.exit({e.code!r}) instead of returning", cause=e,
                              hint="return a value, or raise an exception that says what went wrong") from None
        except Exception as e:
            code = "SYSTEM" if type(e).__name__ == "RuntimeSystemError" else "USER"
            raise TaskFailure(code, f"{type(e).__name__}: {e}", cause=e) from None
        if self.task.report:
            import flyte.report
            from flyte._context import internal_ctx

            report = internal_ctx().get_report()
            if report is not None and report.has_content():
                self._loop.run_until_complete(flyte.report.flush.aio())
        return out

    def output_literal_types(self) -> dict:
        return {}  # flyte 2 outputs are never offloaded by us (see executor.protocol.offload)

    def encode_outputs(self, value) -> dict:
        from flyte._internal.runtime.convert import convert_from_native_to_outputs

        try:
            outputs = self._loop.run_until_complete(convert_from_native_to_outputs(
                value, self.task.native_interface, self.task.name, declared=self._inputs.declared_artifacts))
        except Exception as e:
            raise TaskFailure("OUTPUT_ENCODE", f"the return value could not be converted: {type(e).__name__}: {e}",
                              cause=e) from None
        return {OUTPUTS_FILE: outputs.proto_outputs}
