#!/bin/sh
# The image's entrypoint: settle the environment, then become the server (exec, so that the
# signals `docker stop` and Kubernetes send reach uvicorn rather than this shell).
#
#   no arguments, or only flags  ->  qwen3-moe-serve [flags]
#   any other command            ->  that command, e.g. qwen3-moe-rpc-worker or python
#
# compose.yaml passes every setting, an empty value meaning "the server's default". pydantic
# reads an empty variable as a value (and rejects "" for a number), so empty ones are unset.
#
# A QWEN3_MOE_SERVE_MODEL that names no file falls back to the demo model when
# QWEN3_DEMO_FALLBACK=1 (the image's default), so `docker compose up` starts on a host that has
# no model yet; the Kubernetes manifests set it to 0 so that a wrong path fails the pod.
set -eu

for name in $(env | sed -n 's/^\(QWEN3_MOE_SERVE_[A-Z0-9_]*\)=$/\1/p'); do
    unset "$name"
done

if [ -n "${QWEN3_MOE_SERVE_MODEL:-}" ] && [ ! -f "$QWEN3_MOE_SERVE_MODEL" ] \
    && [ "${QWEN3_DEMO_FALLBACK:-1}" = 1 ]; then
    echo "qwen3-moe-entrypoint: no model file at $QWEN3_MOE_SERVE_MODEL;" \
        "serving the demo model instead (set QWEN3_DEMO_FALLBACK=0 to fail)" >&2
    unset QWEN3_MOE_SERVE_MODEL
fi

case "${1:-}" in
    "" | -*) set -- qwen3-moe-serve "$@" ;;
esac
exec "$@"
