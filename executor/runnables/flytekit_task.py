"""A flytekit task, run through flytekit's own execution context and type engine.

So every type flytekit supports behaves exactly as under `pyflyte-execute`; what we add is the
classification of failures, user-frame tracebacks, timings and atomic writes.
"""
from __future__ import annotations

import contextlib

from executor.errors import IgnoreOutputsRequested, TaskFailure, is_marked_recoverable, out_of_memory
from executor.invocation import Invocation
from executor.protocol.flyte1 import FUTURES_FILE, OUTPUTS_FILE


class FlytekitTask:
    kind = "flytekit task"

    def __init__(self, task, name: str, invocation: Invocation):
        self.task = task
        self.name = name
        self.invocation = invocation
        self._ctx = None

    @classmethod
    def load_with_resolver(cls, invocation: Invocation) -> "FlytekitTask":
        """Any resolver other than the default: flytekit's load_object_from_module, as its entrypoint does."""
        from flytekit.tools.module_loader import load_object_from_module

        try:
            resolver = load_object_from_module(invocation.resolver)
            if isinstance(resolver, type):
                resolver = resolver()
            args = list(invocation.resolver_args)
            if invocation.is_map_task:
                task = resolver.load_task(loader_args=args, max_concurrency=invocation.max_concurrency)
            else:
                task = resolver.load_task(loader_args=args)
        except TaskFailure:
            raise
        except Exception as e:
            raise TaskFailure(
                "IMPORT", f"resolver {invocation.resolver} could not load {args}: {type(e).__name__}: {e}", cause=e
            ) from None
        return cls(task, getattr(task, "name", invocation.resolver), invocation)

    @classmethod
    def load_map(cls, invocation: Invocation, inner_name: str) -> "FlytekitTask":
        runnable = cls.load_with_resolver(invocation)
        runnable.name = f"map({inner_name})"
        return runnable

    @contextlib.contextmanager
    def session(self, invocation: Invocation):
        from flytekit.bin.entrypoint import setup_execution

        with setup_execution(
            invocation.raw_output_prefix,
            invocation.output_prefix,
            invocation.checkpoint_path,
            invocation.prev_checkpoint,
            invocation.dynamic_addl_distro,
            invocation.dynamic_dest_dir,
        ) as ctx:
            self._ctx = ctx
            yield self
            if not getattr(self.task, "disable_deck", True):
                from flytekit.deck.deck import _output_deck

                _output_deck(task_name=self.task.name.split(".")[-1], new_user_params=ctx.user_space_params)

    def decode_inputs(self, literal_map):
        from flytekit.models import literals as literal_models

        return literal_models.LiteralMap.from_flyte_idl(literal_map)

    def call(self, idl_inputs):
        from flytekit.core.base_task import IgnoreOutputs
        from flytekit.exceptions.system import (
            FlyteDownloadDataException,
            FlyteNonRecoverableSystemException,
            FlyteUploadDataException,
        )
        from flytekit.exceptions.user import FlyteUserRuntimeException

        try:
            return self.task.dispatch_execute(self._ctx, idl_inputs)
        except FlyteUserRuntimeException as e:
            value = e.value
            if isinstance(value, IgnoreOutputs):
                raise IgnoreOutputsRequested() from None
            if isinstance(value, MemoryError):
                raise out_of_memory(value) from None
            raise TaskFailure(
                "USER", f"{type(value).__name__}: {value}", cause=value, recoverable=is_marked_recoverable(value)
            ) from None
        except IgnoreOutputs:
            raise IgnoreOutputsRequested() from None
        except FlyteNonRecoverableSystemException as e:
            cause = e.__cause__ or e.value
            code = "INPUT_DECODE" if _raised_in(cause, "_literal_map_to_python_input") else "OUTPUT_ENCODE"
            what = "inputs could not be converted" if code == "INPUT_DECODE" else "the return value could not be converted"
            failure = TaskFailure(code, f"{what}: {type(cause).__name__}: {cause}", cause=cause)
            failure.phase = "inputs" if code == "INPUT_DECODE" else "outputs"  # flytekit converts inside its call
            raise failure from None
        except FlyteUploadDataException as e:
            raise TaskFailure("OUTPUT_UPLOAD", f"uploading an output failed: {e}", cause=e) from None
        except FlyteDownloadDataException as e:
            raise TaskFailure("SYSTEM", f"downloading an input failed: {e}", cause=e) from None

    def output_literal_types(self) -> dict:
        types = {}
        for name, variable in self.task.interface.outputs.items():
            lt = variable.type
            # A map task's interface holds collections; each element's output has the inner type (as flytekit).
            if self.invocation.is_map_task and lt.collection_type is not None:
                lt = lt.collection_type
            types[name] = lt.to_flyte_idl()
        return types

    def encode_outputs(self, outputs) -> dict:
        from flytekit.core.promise import VoidPromise
        from flytekit.models import dynamic_job, literals as literal_models

        if isinstance(outputs, VoidPromise) or outputs is None:
            return {OUTPUTS_FILE: literal_models.LiteralMap(literals={}).to_flyte_idl()}
        if isinstance(outputs, literal_models.LiteralMap):
            return {OUTPUTS_FILE: outputs.to_flyte_idl()}
        if isinstance(outputs, dynamic_job.DynamicJobSpec):
            return {FUTURES_FILE: outputs.to_flyte_idl()}
        raise TaskFailure("OUTPUT_ENCODE", f"flytekit returned {type(outputs).__name__}, not a LiteralMap or DynamicJobSpec")


def _raised_in(exc: BaseException, function_name: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function_name:
            return True
        tb = tb.tb_next
    return False
