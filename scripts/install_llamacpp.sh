#!/usr/bin/env bash
# Installs llama-cpp-python (real llama.cpp) into lorakit's venv, for tests/test_export_llamacpp.py and
# benchmarks/llamacpp.py. The registry ships it as source only; building takes minutes, so the wheel built here is
# kept in lorakit's cache and reused: a second run, or a fresh venv on the same machine, installs it in seconds.
# The wheel is compiled for this CPU's instruction sets, so its cache folder is keyed by the CPU flags.
set -euo pipefail
VERSION=0.3.36
PY=${PY:-.venv/bin/python}

if "$PY" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION is installed"
    exit 0
fi
CACHE=${LORAKIT_CACHE:-$HOME/.cache/lorakit}
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo || true)
KEY=$(echo "$FLAGS" | sha256sum | cut -c1-12)
# x86: the instruction sets this CPU reports, named one by one, except AMX. With GGML_NATIVE (-march=native)
# ggml also compiles its AMX kernels, and on a VM that reports AMX they died here with SIGILL (tilezero on a
# worker thread), killing the test run; the AVX-512/VNNI kernels do the decoding llama.cpp is compared on.
ISA_ARGS="-DGGML_NATIVE=ON"
if [ "$(uname -m)" = x86_64 ]; then
    ISA_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    has() { [[ " $FLAGS " == *" $1 "* ]] && echo ON || echo OFF; }
    avx512=OFF
    [ "$(has avx512f)$(has avx512cd)$(has avx512vl)$(has avx512dq)$(has avx512bw)" = ONONONONON ] && avx512=ON
    ISA_ARGS+=" -DGGML_SSE42=$(has sse4_2) -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)"
    ISA_ARGS+=" -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)"
    ISA_ARGS+=" -DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)"
    ISA_ARGS+=" -DGGML_AVX512_BF16=$(has avx512_bf16)"
fi
DIR="$CACHE/wheels/llama-cpp-python-$VERSION-$(uname -m)-$KEY-noamx"
WHEEL=$(ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)

if [ -z "$WHEEL" ]; then
    echo "building llama-cpp-python $VERSION from the registry's source (cmake + C++ compiler; several minutes)"
    command -v c++ >/dev/null || { echo "no C++ compiler: apt-get install -y build-essential" >&2; exit 1; }
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    # pip's isolated build environment fetches scikit-build-core and cmake from the registry; --no-cache-dir: pip
    # would otherwise reuse a wheel it built earlier with other flags
    CMAKE_ARGS="$ISA_ARGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        "$PY" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$BUILD"
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
