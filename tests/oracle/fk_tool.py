"""flytekit-side helper; runs with the ORACLE venv's python (flytekit 1.16.31 installed).

Values travel between the test process (which has no flytekit) and this tool as cloudpickle
files; their types live in importable task modules (the repo root is on PYTHONPATH).

  write-inputs   --module M --task T --values-pickle F --out inputs.pb --raw-prefix DIR
                 [--map-bound a,b]      (use map_task(T)'s interface, with those inputs bound)
  decode-outputs --module M --task T --outputs outputs.pb [--outputs ...] --result-pickle F
                 --scratch DIR          (pickles a list: one {name: value} dict per outputs.pb)
  fetch          --src URI --dst PATH   (copy one object through flytekit's FileAccessProvider)

Decoded FlyteFile / FlyteDirectory values are replaced by ("file", <bytes>) and
("dir", {relative path: <bytes>}) so that no flytekit type has to unpickle in the test process.
"""
import argparse
import contextlib
import importlib
import os
import pathlib
import sys
import tempfile

import cloudpickle
from flyteidl.core import literals_pb2

from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.data_persistence import FileAccessProvider
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import LiteralMap
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile


@contextlib.contextmanager
def flyte_context(raw_prefix: str, scratch: str):
    os.makedirs(scratch, exist_ok=True)
    fap = FileAccessProvider(local_sandbox_dir=scratch, raw_output_prefix=raw_prefix)
    base = FlyteContextManager.current_context()
    with FlyteContextManager.with_context(base.with_file_access(fap)) as ctx:
        yield ctx


def load_task(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def write_inputs(a) -> None:
    task = load_task(a.module, a.task)
    if a.map_bound is not None:
        from flytekit.core.array_node_map_task import ArrayNodeMapTask

        bound = {v for v in a.map_bound.split(",") if v}
        task = ArrayNodeMapTask(task, bound_inputs=bound)
    types = task.python_interface.inputs
    values = cloudpickle.loads(pathlib.Path(a.values_pickle).read_bytes())
    unknown = set(values) - set(types)
    if unknown:
        raise SystemExit(f"inputs {sorted(unknown)} are not in {a.module}.{a.task}'s interface {sorted(types)}")
    with flyte_context(a.raw_prefix, tempfile.mkdtemp(prefix="fk-tool-")) as ctx:
        lm = TypeEngine.dict_to_literal_map(ctx, values, {k: types[k] for k in values})
        local = pathlib.Path(tempfile.mkdtemp(prefix="fk-tool-")) / "inputs.pb"
        local.write_bytes(lm.to_flyte_idl().SerializeToString())
        ctx.file_access.put_data(str(local), a.out)


def _plain(v, ctx):
    if isinstance(v, FlyteDirectory):
        root = pathlib.Path(v.download())
        return ("dir", {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    if isinstance(v, (FlyteFile, pathlib.PurePath)):
        with open(v, "rb") as fh:
            return ("file", fh.read())
    if isinstance(v, list):
        return [_plain(x, ctx) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x, ctx) for k, x in v.items()}
    return v


def decode_outputs(a) -> None:
    task = load_task(a.module, a.task)
    types = task.python_interface.outputs
    results = []
    with flyte_context(os.path.join(a.scratch, "raw"), a.scratch) as ctx:
        for i, uri in enumerate(a.outputs):
            local = os.path.join(a.scratch, f"outputs-{i}.pb")
            ctx.file_access.get_data(uri, local)
            pb = literals_pb2.LiteralMap()
            pb.ParseFromString(pathlib.Path(local).read_bytes())
            if set(pb.literals) != set(types):
                raise SystemExit(
                    f"{uri}: output names {sorted(pb.literals)} != {a.module}.{a.task}'s outputs {sorted(types)}"
                )
            values = TypeEngine.literal_map_to_kwargs(ctx, LiteralMap.from_flyte_idl(pb), types)
            results.append({k: _plain(v, ctx) for k, v in values.items()})
    pathlib.Path(a.result_pickle).write_bytes(cloudpickle.dumps(results))


def fetch(a) -> None:
    with flyte_context(tempfile.mkdtemp(prefix="fk-tool-"), tempfile.mkdtemp(prefix="fk-tool-")) as ctx:
        ctx.file_access.get_data(a.src, a.dst)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="fk_tool")
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("write-inputs")
    w.add_argument("--module", required=True)
    w.add_argument("--task", required=True)
    w.add_argument("--values-pickle", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--raw-prefix", required=True)
    w.add_argument("--map-bound", default=None)
    w.set_defaults(fn=write_inputs)

    d = sub.add_parser("decode-outputs")
    d.add_argument("--module", required=True)
    d.add_argument("--task", required=True)
    d.add_argument("--outputs", action="append", required=True)
    d.add_argument("--result-pickle", required=True)
    d.add_argument("--scratch", required=True)
    d.set_defaults(fn=decode_outputs)

    f = sub.add_parser("fetch")
    f.add_argument("--src", required=True)
    f.add_argument("--dst", required=True)
    f.set_defaults(fn=fetch)

    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
