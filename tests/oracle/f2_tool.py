"""flyte 2-side helper; runs with the ORACLE venv's python (flyte 2.12.1 installed).

Values travel between the test process (no flyte) and this tool as cloudpickle files; their types
live in importable task modules (the repo root is on PYTHONPATH). Every command prints JSON.

  write-inputs   --module M --task T --values-pickle F --out PATH [--context K=V ...]
                 (flyte's convert_from_native_to_inputs: a flyteidl2 Inputs; File values given as
                 ("file", <path>) become flyte.io.File literals pointing at that path)
  decode-outputs --module M --task T --outputs PATH [--outputs ...] --result-pickle F
                 (flyte's TypeEngine against the task's outputs; one {name: value} dict per file;
                 File outputs come back as ("file", <bytes>))
  bundle-tgz     --src DIR --out DIR     flyte's own bundler (copy_style all): {"tgz", "version"}
  bundle-pkl     --module M --task T --out DIR   flyte's build_pkl_bundle: {"pkl", "version"}
  argv           --module M --task T --root DIR [--tgz U | --pkl U] [--version V]
                 the task's own container args (RuntimeTaskTemplate.container_args), templates unrendered
"""
import argparse
import asyncio
import importlib
import json
import pathlib
import sys

import cloudpickle


def load_task(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def write_inputs(a) -> None:
    from flyte._internal.runtime.convert import convert_from_native_to_inputs
    from flyte.io import File

    task = load_task(a.module, a.task)
    values = cloudpickle.loads(pathlib.Path(a.values_pickle).read_bytes())
    for k, v in list(values.items()):
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "file":
            values[k] = File.from_existing_remote(v[1])
    context = dict(kv.split("=", 1) for kv in a.context or [])
    inputs = asyncio.run(convert_from_native_to_inputs(task.native_interface, custom_context=context or None, **values))
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_bytes(inputs.proto_inputs.SerializeToString())
    print(json.dumps({"inputs": a.out}))


async def _plain(v):
    from flyte.io import File

    if isinstance(v, File):
        local = await v.download()
        return ("file", pathlib.Path(local).read_bytes())
    if isinstance(v, list):
        return [await _plain(x) for x in v]
    if isinstance(v, dict):
        return {k: await _plain(x) for k, x in v.items()}
    return v


def decode_outputs(a) -> None:
    from flyteidl2.core import literals_pb2
    from flyteidl2.task import common_pb2
    from flyte.types import TypeEngine

    task = load_task(a.module, a.task)
    types = task.native_interface.outputs

    async def decode(path: str) -> dict:
        outputs = common_pb2.Outputs.FromString(pathlib.Path(path).read_bytes())
        names = [n.name for n in outputs.literals]
        if sorted(names) != sorted(types):
            raise SystemExit(f"{path}: output names {names} != {a.module}.{a.task}'s outputs {sorted(types)}")
        lm = literals_pb2.LiteralMap(literals={n.name: n.value for n in outputs.literals})
        values = await TypeEngine.literal_map_to_kwargs(lm, types)
        return {k: await _plain(v) for k, v in values.items()}

    async def all_of() -> list:
        return [await decode(p) for p in a.outputs]

    pathlib.Path(a.result_pickle).write_bytes(cloudpickle.dumps(asyncio.run(all_of())))
    print(json.dumps({"decoded": len(a.outputs)}))


def bundle_tgz(a) -> None:
    from flyte._code_bundle.bundle import build_code_bundle

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = asyncio.run(build_code_bundle(pathlib.Path(a.src), dryrun=True, copy_bundle_to=out, copy_style="all",
                                           skip_cache=True))
    print(json.dumps({"tgz": bundle.tgz, "version": bundle.computed_version}))


def bundle_pkl(a) -> None:
    from flyte._code_bundle.bundle import build_pkl_bundle

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = asyncio.run(build_pkl_bundle(load_task(a.module, a.task), upload_to_controlplane=False, copy_bundle_to=out))
    print(json.dumps({"pkl": bundle.pkl, "version": bundle.computed_version}))


def argv(a) -> None:
    from flyte.models import CodeBundle, SerializationContext

    task = load_task(a.module, a.task)
    bundle = CodeBundle(tgz=a.tgz, pkl=a.pkl, computed_version=a.version) if (a.tgz or a.pkl) else None
    ctx = SerializationContext(version=a.version, code_bundle=bundle, root_dir=pathlib.Path(a.root),
                               input_path="{{.input}}", output_path="{{.outputPrefix}}")
    print(json.dumps(task.container_args(ctx)))


def main(args=None) -> None:
    p = argparse.ArgumentParser(prog="f2_tool")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-inputs")
    for flag in ("--module", "--task", "--values-pickle", "--out"):
        w.add_argument(flag, required=True)
    w.add_argument("--context", action="append")
    w.set_defaults(fn=write_inputs)
    d = sub.add_parser("decode-outputs")
    for flag in ("--module", "--task", "--result-pickle"):
        d.add_argument(flag, required=True)
    d.add_argument("--outputs", action="append", required=True)
    d.set_defaults(fn=decode_outputs)
    t = sub.add_parser("bundle-tgz")
    t.add_argument("--src", required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(fn=bundle_tgz)
    k = sub.add_parser("bundle-pkl")
    for flag in ("--module", "--task", "--out"):
        k.add_argument(flag, required=True)
    k.set_defaults(fn=bundle_pkl)
    g = sub.add_parser("argv")
    for flag in ("--module", "--task", "--root"):
        g.add_argument(flag, required=True)
    g.add_argument("--tgz")
    g.add_argument("--pkl")
    g.add_argument("--version", default="")
    g.set_defaults(fn=argv)
    a = p.parse_args(args)
    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
