#!/usr/bin/env bash
# Install llama-cpp-python into ./.venv, built for this CPU with llama.cpp's AMX kernel compiled out.
#
# Why: the sdist builds with -march=native. On Intel CPUs with AMX (Sapphire Rapids and later) that
# compiles ggml's AMX matrix kernel, which crashes (ggml-org/llama.cpp#20824) or computes garbage
# (#16315) on Q4_0/Q4_1 weights. ggml guards that kernel with `__AMX_INT8__ && __AVX512VNNI__`, so
# -mno-amx-* removes it while keeping every other feature of the CPU (AVX2, AVX-512, VNNI, BF16).
#
# A native build is only right for the CPU it was built on, and pip's wheel cache is keyed by version
# alone, so pip's cache is bypassed: the wheel is kept in $LORABLEND_HOME/llamacpp-wheels/KEY, where
# KEY hashes the version, the flags, the compiler and this CPU's feature flags. A .venv whose build
# does not match this machine (another CPU, an AMX build left by an older set-up) is reinstalled.
# What was built, and how, is recorded in .venv/llamacpp-build.json (tests/test_llamacpp_build.py
# checks the library against it).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
PY=.venv/bin/python
CFLAGS_EXTRA=""
case "$(uname -m)" in
  x86_64|amd64|i?86) CFLAGS_EXTRA="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
esac
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr ' ' '\n' | LC_ALL=C sort | tr '\n' ' ' || true)
compiler=$(${CC:-cc} --version 2>/dev/null | head -1 || echo unknown)
key=$(printf '%s\n' "$VERSION" "$CFLAGS_EXTRA" "$compiler" "$(uname -m)" "$cpu_flags" | sha256sum | cut -c1-16)
record=.venv/llamacpp-build.json
if [ -f "$record" ] && grep -q "\"key\": \"$key\"" "$record" && "$PY" -c "import llama_cpp" 2>/dev/null; then
  exit 0
fi
home=${LORABLEND_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/lorablend}
wheels="$home/llamacpp-wheels/$key"
if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION for this CPU, without AMX (once per CPU; ~5 min on 2 cores; LLAMACPP=0 skips it)" >&2
  tmp="$wheels.partial.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  # The build needs its own build deps only; --no-cache-dir so no wheel built for another CPU is reused.
  CFLAGS="${CFLAGS:-} $CFLAGS_EXTRA" CXXFLAGS="${CXXFLAGS:-} $CFLAGS_EXTRA" CMAKE_ARGS="-DGGML_NATIVE=ON ${CMAKE_ARGS:-}" \
    "$PY" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps -w "$tmp" "llama-cpp-python==$VERSION"
  rm -rf "$wheels"; mv "$tmp" "$wheels"
fi
"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheels"/llama_cpp_python-"$VERSION"-*.whl
# Its pure-Python dependencies (numpy, jinja2, diskcache, typing-extensions) come from the registry as usual.
"$PY" -m pip install --quiet --disable-pip-version-check "llama-cpp-python==$VERSION"
"$PY" - "$record" "$key" "$VERSION" "$CFLAGS_EXTRA" "$compiler" "$cpu_flags" <<'PY'
import json, sys
out, key, version, cflags, compiler, cpu = sys.argv[1:]
with open(out + ".tmp", "w") as f:
    json.dump({"key": key, "version": version, "cflags": cflags.split(), "cmake_args": ["-DGGML_NATIVE=ON"],
               "compiler": compiler, "cpu_flags": cpu.split()}, f, indent=1)
import os; os.replace(out + ".tmp", out)
PY
