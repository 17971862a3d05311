#!/usr/bin/env bash
# Install llama-cpp-python into ./.venv, built for this CPU.
#
# The sdist builds with -march=native. On Intel CPUs with AMX (Sapphire Rapids and later) that compiles
# ggml's AMX matrix kernels, which are reported to crash (ggml-org/llama.cpp#20824) or compute garbage
# (#16315) on quantized weights in some builds. Built by clang >= 19 with OpenMP they were checked here
# (docs/PERFORMANCE.md, "llama.cpp's AMX kernels"): the same losses and answers as the build without
# them, and 7B scoring 2-3.5x faster. So they are compiled in only on a CPU with AMX and with such a
# clang on PATH; otherwise -mno-amx-* removes them (ggml guards them with `__AMX_INT8__ &&
# __AVX512VNNI__`) while keeping every other feature of the CPU (AVX2, AVX-512, VNNI, BF16).
# LLAMACPP_AMX=0 keeps them out; LLAMACPP_PLAN=1 prints the choice and builds nothing.
#
# A native build is only right for the CPU it was built on, and pip's wheel cache is keyed by version
# alone, so pip's cache is bypassed: the wheel is kept in $LORABLEND_HOME/llamacpp-wheels/KEY, where
# KEY hashes the version, the flags, the compiler and this CPU's feature flags. A .venv whose build
# does not match this machine (another CPU, another compiler or flags) is reinstalled.
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
cpu_flags=$(grep -m1 -E '^(flags|Features)' "${LLAMACPP_CPUINFO:-/proc/cpuinfo}" 2>/dev/null | cut -d: -f2 | tr ' ' '\n' | LC_ALL=C sort | tr '\n' ' ' || true)

# The first clang >= 19 on PATH that builds with OpenMP (the AMX build was checked with clang 19 and OpenMP).
amx_clang() {
  local cc major
  for cc in clang-22 clang-21 clang-20 clang-19 clang; do
    command -v "$cc" >/dev/null && command -v "${cc/clang/clang++}" >/dev/null || continue
    major=$("$cc" --version 2>/dev/null | sed -n 's/.*clang version \([0-9][0-9]*\)\..*/\1/p' | head -1)
    [ -n "$major" ] && [ "$major" -ge 19 ] || continue
    "$cc" -fopenmp -x c - -o /dev/null 2>/dev/null <<<'int main(void){return 0;}' || continue
    echo "$cc"; return 0
  done
  return 1
}
amx=0
plan="without AMX kernels (this CPU has no AMX)"
if [ -n "$CFLAGS_EXTRA" ] && [[ " $cpu_flags " == *" amx_int8 "* ]]; then
  if [ "${LLAMACPP_AMX:-1}" = 0 ]; then
    plan="without AMX kernels (LLAMACPP_AMX=0)"
  elif cc=$(amx_clang); then
    amx=1; CFLAGS_EXTRA=""; export CC=$cc CXX=${cc/clang/clang++}
    plan="with AMX kernels, by $cc"
  else
    plan="without AMX kernels: they are built only by clang >= 19 with OpenMP (e.g. apt install clang-19 libomp-19-dev), which makes 7B scoring 2-3.5x faster on this CPU"
  fi
fi
if [ "${LLAMACPP_PLAN:-0}" = 1 ]; then
  echo "$plan"; exit 0
fi
compiler=$(${CC:-cc} --version 2>/dev/null | head -1 || echo unknown)
key=$(printf '%s\n' "$VERSION" "$CFLAGS_EXTRA" "$compiler" "$(uname -m)" "$cpu_flags" | sha256sum | cut -c1-16)
record=.venv/llamacpp-build.json
if [ -f "$record" ] && grep -q "\"key\": \"$key\"" "$record" && "$PY" -c "import llama_cpp" 2>/dev/null; then
  exit 0
fi
home=${LORABLEND_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/lorablend}
wheels="$home/llamacpp-wheels/$key"
if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION for this CPU, $plan (once per CPU; ~5 min on 2 cores; LLAMACPP=0 skips it)" >&2
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
"$PY" - "$record" "$key" "$VERSION" "$CFLAGS_EXTRA" "$compiler" "$cpu_flags" "$amx" <<'PY'
import json, sys
out, key, version, cflags, compiler, cpu, amx = sys.argv[1:]
with open(out + ".tmp", "w") as f:
    json.dump({"key": key, "version": version, "cflags": cflags.split(), "cmake_args": ["-DGGML_NATIVE=ON"],
               "compiler": compiler, "cpu_flags": cpu.split(), "amx": amx == "1"}, f, indent=1)
import os; os.replace(out + ".tmp", out)
PY
