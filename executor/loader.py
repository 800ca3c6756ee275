"""Resolver arguments -> a Runnable: a plain typed function, or an SDK task run through its SDK.

flytekit's default resolver is `getattr(importlib.import_module(M), T)`, and so is flyte 2's
(`mod M instance T`); we do the same without importing either SDK, and only hand over to the SDK
when the attribute turns out to be its task.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import FunctionType

from executor.errors import TaskFailure
from executor.invocation import DEFAULT_RESOLVER, FLYTE2_RESOLVER, MAP_RESOLVER, Invocation, MapSpec


def load(invocation: Invocation):
    if invocation.protocol == "flyte2":
        return _load_flyte2(invocation)
    _put_cwd_on_path()
    if invocation.resolver == DEFAULT_RESOLVER:
        obj, name = _load_default(invocation.resolver_args)
        return _runnable(obj, name, invocation, map_spec=None)
    if invocation.resolver == MAP_RESOLVER:
        return _load_map(invocation)
    return _load_custom(invocation)


def _put_cwd_on_path() -> None:
    # As flytekit does: the working directory is importable, after everything already on sys.path.
    cwd = os.getcwd()
    if all(_realpath(p) != cwd for p in sys.path):
        sys.path.append(cwd)


_realpaths: dict[str, str] = {}


def _realpath(entry: str) -> str:
    """realpath of a sys.path entry; an absolute one's is remembered (a warm pool checks the same entries
    for every invocation, each a dozen lstat calls), a relative one depends on the cwd."""
    if not os.path.isabs(entry):
        return os.path.realpath(entry or ".")
    if entry not in _realpaths:
        _realpaths[entry] = os.path.realpath(entry)
    return _realpaths[entry]


def _load_default(args: tuple[str, ...]):
    if len(args) < 4 or args[0] != "task-module" or args[2] != "task-name":
        raise TaskFailure(
            "IMPORT",
            f"resolver arguments {list(args)} are not 'task-module <module> task-name <name>'",
            hint=f"{DEFAULT_RESOLVER} expects exactly that form after '--'",
        )
    return import_task_attribute(args[1], args[3]), f"{args[1]}.{args[3]}"


def import_task_attribute(module_name: str, attr: str):
    """getattr(import_module(M), T), as every SDK's default resolver does, with errors that help."""
    module = import_task_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        candidates = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:20]
        raise TaskFailure(
            "IMPORT",
            f"module {module_name!r} has no attribute {attr!r}",
            hint=f"callables it does define: {', '.join(candidates) or 'none'}",
        ) from None


def import_task_module(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise TaskFailure(
                "IMPORT",
                f"cannot import task module {module_name!r}: no module named {e.name!r}",
                cause=e,
                hint=f"is the code in the image or the bundle? cwd={os.getcwd()}, sys.path={sys.path[:6]}",
            ) from None
        raise TaskFailure(
            "IMPORT",
            f"task module {module_name!r} failed to import: {type(e).__name__}: {e}",
            cause=e,
            hint="a dependency the task module imports is not installed in the image",
        ) from None
    except BaseException as e:  # SyntaxError, errors raised at import time, even SystemExit
        if isinstance(e, KeyboardInterrupt):
            raise
        raise TaskFailure(
            "IMPORT", f"task module {module_name!r} failed to import: {type(e).__name__}: {e}", cause=e
        ) from None


def _load_map(invocation: Invocation):
    args = invocation.resolver_args
    if len(args) < 4 or args[0] != "vars" or args[2] != "resolver":
        raise TaskFailure(
            "IMPORT",
            f"map resolver arguments {list(args)} are not 'vars <a,b> resolver <inner resolver> <inner args>'",
        )
    bound = frozenset(v for v in args[1].split(",") if v)
    inner_resolver, inner_args = args[3], tuple(args[4:])
    if inner_resolver != DEFAULT_RESOLVER:
        return _load_custom(invocation)
    obj, name = _load_default(inner_args)
    spec = MapSpec(index=array_index(), bound_inputs=bound, max_concurrency=invocation.max_concurrency)
    return _runnable(obj, name, invocation, map_spec=spec)


def array_index() -> int:
    """flytekit's formula: BATCH_JOB_ARRAY_INDEX_OFFSET + int(env[env[BATCH_JOB_ARRAY_INDEX_VAR_NAME]])."""
    offset_text = os.environ.get("BATCH_JOB_ARRAY_INDEX_OFFSET") or "0"
    var_name = os.environ.get("BATCH_JOB_ARRAY_INDEX_VAR_NAME")
    index_text = os.environ.get(var_name, "0") if var_name else "0"
    try:
        return int(offset_text) + int(index_text)
    except ValueError:
        raise TaskFailure(
            "INPUT_DECODE",
            f"cannot compute the map-task index: BATCH_JOB_ARRAY_INDEX_OFFSET={offset_text!r}, "
            f"{var_name or 'BATCH_JOB_ARRAY_INDEX_VAR_NAME'}={index_text!r} are not integers",
        ) from None


def _is_flytekit_task(obj) -> bool:
    return any(cls.__module__.startswith("flytekit.") for cls in type(obj).__mro__)


# A plain function's signature read once per process: a warm pool reads it before forking, and each
# forked child (or in-process invocation) then reuses it instead of re-reading the annotations.
_plain_runnables: dict = {}


def _runnable(obj, name: str, invocation: Invocation, map_spec: MapSpec | None):
    if _is_flytekit_task(obj):
        from executor.runnables.flytekit_task import FlytekitTask

        if map_spec is not None:
            return FlytekitTask.load_map(invocation, name)
        return FlytekitTask(obj, name, invocation)
    if callable(obj):
        cacheable = map_spec is None and type(obj) is FunctionType
        if cacheable and (obj, name) in _plain_runnables:
            return _plain_runnables[obj, name]
        from executor.runnables.plain import PlainFunction

        runnable = PlainFunction.from_callable(obj, name, map_spec)
        if cacheable:
            _plain_runnables[obj, name] = runnable
        return runnable
    raise TaskFailure("IMPORT", f"{name} is a {type(obj).__name__}, not a task or a function")


def _load_custom(invocation: Invocation):
    """Any other resolver is flytekit's business: load it through flytekit, as its entrypoint would."""
    from executor.runnables.flytekit_task import FlytekitTask

    return FlytekitTask.load_with_resolver(invocation)


# --- Flyte 2 (a0) ----------------------------------------------------------------------------


def _is_flyte2_task(obj) -> bool:
    return any(cls.__module__ == "flyte" or cls.__module__.startswith("flyte.") for cls in type(obj).__mro__)


def _flyte2_sys_path() -> None:
    """As a0: the working directory first on sys.path, and _F_SYS_PATH's entries before it."""
    if "." not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, ".")
    entries = [p for p in os.environ.get("_F_SYS_PATH", "").split(":") if p and p not in sys.path]
    for entry in reversed(entries):
        sys.path.insert(0, entry)


def _load_flyte2(invocation: Invocation):
    spec = invocation.flyte2
    _flyte2_sys_path()
    if spec.pkl_uri:
        from executor.bundle.inject import verify_policy
        from executor.bundle import pkl

        expected = spec.version.lower() if invocation.bundle is None and _is_md5(spec.version) else None
        try:
            obj = pkl.load(spec.pkl_uri, expected, verify_policy())
        except TaskFailure as failure:
            if failure.code.startswith("BUNDLE_"):
                failure.phase = "bundle"
            raise
        name = getattr(obj, "name", None) or getattr(obj, "__qualname__", None) or "pickled task"
    elif not invocation.resolver or not invocation.resolver_args:
        raise TaskFailure(
            "IMPORT",
            "a0 was given no --resolver and resolver arguments, and no --pkl bundle: there is no task to load",
            hint=f"flyte writes '--resolver {FLYTE2_RESOLVER} mod <module> instance <task>'",
        )
    elif invocation.resolver == FLYTE2_RESOLVER:
        args = invocation.resolver_args
        if len(args) < 4:  # flyte's resolver unpacks `_, module, _, name, *_`
            raise TaskFailure(
                "IMPORT",
                f"resolver arguments {list(args)} are not 'mod <module> instance <task>'",
                hint=f"{FLYTE2_RESOLVER} expects exactly that form",
            )
        obj = import_task_attribute(args[1], args[3])
        name = f"{args[1]}.{args[3]}"
    else:
        from executor.runnables.flyte2_task import load_with_resolver

        obj = load_with_resolver(invocation.resolver, invocation.resolver_args)
        name = getattr(obj, "name", None) or invocation.resolver
    if _is_flyte2_task(obj):
        from executor.runnables.flyte2_task import Flyte2Task

        return Flyte2Task(obj, name, invocation)
    if _is_flytekit_task(obj):
        raise TaskFailure("IMPORT", f"{name} is a flytekit (Flyte 1) task; a0 runs flyte 2 tasks",
                          hint="register it with pyflyte, whose pods run pyflyte-execute")
    if callable(obj):
        from executor.runnables.plain import PlainFunction

        return PlainFunction.from_callable(obj, name)
    raise TaskFailure("IMPORT", f"{name} is a {type(obj).__name__}, not a task or a function")


def _is_md5(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text.lower())
