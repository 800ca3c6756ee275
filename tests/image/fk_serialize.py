"""Runs inside the flytekit oracle venv: serialize one task as `pyflyte register`/`package` would.

    python fk_serialize.py SRC_DIR MODULE TASK OUT_DIR [BUNDLE_URI DEST_DIR]

Writes OUT_DIR/task_template.pb (flyteidl.core.TaskTemplate) and OUT_DIR/0_<name>_1.pb (the
flyteidl.admin.TaskSpec that `pyflyte package` writes). With BUNDLE_URI the task is serialized
for fast registration, so its args start with `pyflyte-fast-execute --additional-distribution`.
"""
import importlib
import os
import sys
from collections import OrderedDict


def main(argv):
    src, module, name, out = argv[:4]
    fast = argv[4:6]
    sys.path.insert(0, src)
    from flytekit.configuration import FastSerializationSettings, Image, ImageConfig, SerializationSettings
    from flytekit.tools.translator import get_serializable

    settings = SerializationSettings(
        image_config=ImageConfig(default_image=Image(name="default", fqn="localhost/executor", tag="test")),
        project="proj", domain="dev", version="v1",
        env={"FROM_TEMPLATE": "yes"},
        fast_serialization_settings=FastSerializationSettings(
            enabled=True, distribution_location=fast[0], destination_dir=fast[1]) if fast else None,
    )
    task = getattr(importlib.import_module(module), name)
    spec = get_serializable(OrderedDict(), settings, task).to_flyte_idl()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "task_template.pb"), "wb") as f:
        f.write(spec.template.SerializeToString())
    with open(os.path.join(out, f"0_{spec.template.id.name}_1.pb"), "wb") as f:
        f.write(spec.SerializeToString())
    print(spec.template.id.name)


if __name__ == "__main__":
    main(sys.argv[1:])
