"""A pod-style invocation whose inputs, outputs and pickles all live in a real object store on loopback."""
from __future__ import annotations

import pickle

import pytest
from flyteidl.core import literals_pb2

from executor.literals import Context, to_literal
from tests.helpers import pyflyte_execute_args, run_executor

def _inputs(values: dict, annotations: dict) -> bytes:
    m = literals_pb2.LiteralMap()
    for k, v in values.items():
        m.literals[k].CopyFrom(to_literal(v, annotations[k], Context()))
    return m.SerializeToString()


@pytest.fixture(params=["s3", "gs"])
def store(request, moto_s3, gcs_emulator):
    server = moto_s3 if request.param == "s3" else gcs_emulator
    bucket = server.make_bucket()
    return request.param, server, bucket


def test_add_through_object_store(store):
    scheme, server, bucket = store
    server.put(bucket, "run/inputs.pb", _inputs({"x": 6, "factor": 7}, {"x": int, "factor": int}))
    args = pyflyte_execute_args(f"{scheme}://{bucket}/run/inputs.pb", f"{scheme}://{bucket}/run/out",
                                "tests.sample_tasks.failures", "scale", raw=f"{scheme}://{bucket}/raw")
    run = run_executor(args, env=server.env)
    assert run.returncode == 0, run.stderr
    out = literals_pb2.LiteralMap()
    out.ParseFromString(server.get(bucket, "run/out/outputs.pb"))
    assert out.literals["o0"].scalar.primitive.integer == 42
    assert server.get(bucket, "run/out/error.pb") is None


def test_error_document_lands_in_object_store(store):
    scheme, server, bucket = store
    server.put(bucket, "run/inputs.pb", _inputs({"x": 1}, {"x": int}))
    args = pyflyte_execute_args(f"{scheme}://{bucket}/run/inputs.pb", f"{scheme}://{bucket}/run/out",
                                "tests.sample_tasks.failures", "user_error")
    run = run_executor(args, env=server.env)
    assert run.returncode == 0, run.stderr
    from flyteidl.core import errors_pb2

    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString(server.get(bucket, "run/out/error.pb"))
    assert doc.error.code == "USER" and "x must be positive" in doc.error.message
    assert server.get(bucket, "run/out/outputs.pb") is None


def test_missing_inputs_in_object_store(store):
    scheme, server, bucket = store
    args = pyflyte_execute_args(f"{scheme}://{bucket}/nope/inputs.pb", f"{scheme}://{bucket}/run/out",
                                "tests.sample_tasks.failures", "double")
    run = run_executor(args, env=server.env)
    from flyteidl.core import errors_pb2

    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString(server.get(bucket, "run/out/error.pb"))
    assert doc.error.code == "SYSTEM" and "does not exist" in doc.error.message and doc.error.kind == 1


def test_pickled_output_goes_to_raw_prefix(moto_s3):
    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, "run/inputs.pb", _inputs({"n": 3}, {"n": int}))
    args = pyflyte_execute_args(f"s3://{bucket}/run/inputs.pb", f"s3://{bucket}/run/out",
                                "tests.sample_tasks.pickles", "make_counter", raw=f"s3://{bucket}/raw")
    run = run_executor(args, env=moto_s3.env)
    assert run.returncode == 0, run.stderr
    out = literals_pb2.LiteralMap()
    out.ParseFromString(moto_s3.get(bucket, "run/out/outputs.pb"))
    blob = out.literals["o0"].scalar.blob
    assert blob.metadata.type.format == "PythonPickle" and blob.uri.startswith(f"s3://{bucket}/raw/")
    key = blob.uri[len(f"s3://{bucket}/"):]
    from tests.sample_tasks.pickles import Counter

    assert pickle.loads(moto_s3.get(bucket, key)) == Counter(3)
