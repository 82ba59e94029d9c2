#!/usr/bin/env bash
# Installs llama-cpp-python (real llama.cpp) into lorakit's venv, for tests/test_export_llamacpp.py and
# benchmarks/llamacpp.py. The registry ships it as source only; building takes minutes, so the wheel built here is
# kept in lorakit's cache and reused: a second run, or a fresh venv on the same machine, installs it in seconds.
# The wheel is compiled for this CPU's instruction set (GGML_NATIVE), so its cache folder is keyed by the CPU flags.
set -euo pipefail
VERSION=0.3.36
PY=${PY:-.venv/bin/python}

if "$PY" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION is installed"
    exit 0
fi
CACHE=${LORAKIT_CACHE:-$HOME/.cache/lorakit}
KEY=$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)
DIR="$CACHE/wheels/llama-cpp-python-$VERSION-$(uname -m)-$KEY"
WHEEL=$(ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)

if [ -z "$WHEEL" ]; then
    echo "building llama-cpp-python $VERSION from the registry's source (cmake + C++ compiler; several minutes)"
    command -v c++ >/dev/null || { echo "no C++ compiler: apt-get install -y build-essential" >&2; exit 1; }
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    # pip's isolated build environment fetches scikit-build-core and cmake from the registry
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$BUILD"
    mkdir -p "$DIR"
    built=$(ls "$BUILD"/llama_cpp_python-*.whl)
    cp "$built" "$DIR/.$(basename "$built").tmp"
    mv "$DIR/.$(basename "$built").tmp" "$DIR/$(basename "$built")"  # whole or absent, for a concurrent run
    WHEEL="$DIR/$(basename "$built")"
    echo "cached $WHEEL"
fi
# its Python dependencies (numpy, typing-extensions, diskcache, jinja2) come from the registry
"$PY" -m pip install -q "$WHEEL"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'from', '$WHEEL')"
