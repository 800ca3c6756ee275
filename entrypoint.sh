#!/bin/sh
# The image's ENTRYPOINT. Flyte's argv goes to the executor; any other command runs unchanged.
#
#   pyflyte-fast-execute | pyflyte-execute | pyflyte-map-execute | a0 ...  ->  python -m executor <argv>
#   executor ARGS...  |  -h / --help / -*                                  ->  python -m executor ARGS...
#   (no arguments)                                                         ->  python -m executor --help
#   anything else (bash, sh -c ..., python ...)                            ->  exec'd as given
#
# PID 1: when this script is PID 1 and tini is installed, the command runs under `tini --`, which
# reaps zombies and forwards SIGTERM/SIGINT to it (a shell or python as PID 1 does neither and
# gets no default signal actions: a SIGTERM would be ignored until the kubelet's SIGKILL).
# EXECUTOR_INIT=none skips tini and execs the command directly (it is then PID 1 itself).
set -eu

python="${EXECUTOR_PYTHON:-/opt/executor/bin/python}"

case "${1-}" in
    pyflyte-fast-execute|pyflyte-execute|pyflyte-map-execute|a0)
        set -- "$python" -m executor "$@" ;;
    executor)
        shift
        set -- "$python" -m executor "$@" ;;
    -*)
        set -- "$python" -m executor "$@" ;;
    "")
        set -- "$python" -m executor --help ;;
esac

if [ "$$" = 1 ] && [ "${EXECUTOR_INIT:-tini}" = tini ] && command -v tini >/dev/null 2>&1; then
    exec tini -- "$@"
fi
exec "$@"
