"""flytekit-authored tasks for the runtime-control tests (imported only in the oracle venv)."""
import os

import flytekit
from flytekit import Secret, task
from flytekit.exceptions.user import FlyteRecoverableException


@task(secret_requests=[Secret(group="api", key="token")])
def secret_length(x: int) -> int:
    value = flytekit.current_context().secrets.get("api", "token")
    print(f"flytekit task sees {value}")
    return len(value) + x


@task
def resumes(x: int) -> str:
    cp = flytekit.current_context().checkpoint
    previous = cp.read()
    cp.write(f"saved by x={x}".encode())
    return previous.decode() if previous else "none"


@task
def flaky(x: int) -> int:
    path = os.path.join(os.environ["SCRATCH"], "attempts")
    count = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    if count < 1:
        raise FlyteRecoverableException("first attempt fails")
    return count + 1
