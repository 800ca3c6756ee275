"""`executor serve`: many invocations warm in one container, each isolated (docs/serve.md).

    server.py      admission, dispatch, results, cancel, drain      (the core; no sockets)
    api.py         HTTP and JSON-lines front-ends
    arbiter.py     the main loop: signals, drain, idle exit
    pool.py        warm pools: one fork server per (bundle digest, task module), LRU, recycling
    forkserver.py  the warm process: imports once, forks an isolated child per invocation
    isolation.py   what one invocation sees: env, cwd, TMPDIR, secrets
    registry.py    invocations by id (idempotency)      metrics.py  Prometheus text
    settings.py    every setting, declared once          channel.py  server <-> worker messages

Nothing here is imported by the one-shot path.
"""


def main(argv: list[str]) -> int:
    from executor.serve.arbiter import main as arbiter_main

    return arbiter_main(argv)
