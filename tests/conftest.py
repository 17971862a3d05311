"""Shared fixtures: a tiny random model for fast tests, the real SmolLM2 for `slow` ones, and what several
test files share (a user dataset, the in-process CLI, GGUF files and llama.cpp, bank tasks, one bench study).

Nothing here downloads but llama.cpp's converter scripts (once, into the user's cache): the hub is forced
offline and lorablend's cache points at a session temp dir, so tests never read or write the user's cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lorablend.runtime.models import lorablend_home  # noqa: E402

# Read at import, before `lorablend_home_dir` points $LORABLEND_HOME at a session temp dir.
SDIST_CACHE = lorablend_home() / "llama-cpp"

# SmolLM2's ChatML template without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "Please summarise the following article in one sentence.",
    "Translate this sentence into French: the cat sleeps on the mat.",
    "The answer is 42, but what was the question?",
    "Add 12 and 30 to get 42; multiply 6 by 7 to get 42 as well.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -7 50%",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / \\ @ # $ % & * + = < > | ~ `",
    "A user asks a question and the assistant gives a helpful answer.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The sun rises in the east and sets in the west.",
    "Write a short poem about the sea and the stars.",
    "Classify the sentiment of this review: I loved the film!",
    "The movie was boring and far too long; I would not watch it again.",
    "Is this email spam or not spam? Reply with one word.",
    "Extract the names of people mentioned in the text below.",
    "Alice met Bob in London on Monday, and they had tea together.",
    "Python is a programming language; def add(a, b): return a + b",
    "Sort these numbers from smallest to largest: 9, 3, 7, 1.",
    "The train leaves at 8:15 and arrives at 10:45.",
    "Explain why the sky is blue in simple words.",
    "Light from the sun is scattered by the air, and blue light scatters most.",
    "Question: how many legs does a spider have? Answer: eight.",
    "Question: what colour is grass? Answer: green.",
    "Give three tips for staying healthy: sleep well, eat vegetables, exercise.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Summary: the report says sales grew by 5 percent this year.",
    "Rewrite the sentence in the passive voice: the dog chased the ball.",
    "Yes. No. Maybe. True or false? It is true.",
    "Hello, world! How are you today? I am fine, thank you.",
]


def build_tiny_tokenizer():
    """A deterministic byte-level BPE (~400 tokens) with SmolLM2's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


@pytest.fixture(scope="session", autouse=True)
def lorablend_home_dir(tmp_path_factory) -> Path:
    """Point $LORABLEND_HOME at a session temp dir so tests never touch the user's cache."""
    home = tmp_path_factory.mktemp("lorablend-home")
    old = os.environ.get("LORABLEND_HOME")
    os.environ["LORABLEND_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("LORABLEND_HOME", None)
    else:
        os.environ["LORABLEND_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM + BPE tokenizer dir, loadable with from_pretrained (~1 s)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(lorablend_home_dir) -> Path:
    """The real SmolLM2-135M-Instruct as a local fp32 dir (converted from the wheel's GGUF).

    Converts into the session home (~40 s), or once into $LORABLEND_TEST_HOME to reuse it
    across runs (linked from the session home); either way the returned path is what
    `resolve_model("smollm2")` gives during the session.
    """
    from lorablend.runtime.models import fetch_smollm2

    persistent = os.environ.get("LORABLEND_TEST_HOME")
    os.environ["LORABLEND_HOME"] = persistent or str(lorablend_home_dir)
    try:
        path = fetch_smollm2(progress=False)  # the setup installs the wheel: a missing one fails, never skips
    finally:
        os.environ["LORABLEND_HOME"] = str(lorablend_home_dir)
    if not persistent:
        return path
    link = lorablend_home_dir / "models" / path.name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path, target_is_directory=True)
    return link


# --------------------------------------------------------------------------- #
# A tiny bank: random LoRA adapters for the tiny model, each with its own dataset
# --------------------------------------------------------------------------- #

TOPICS = {
    "animals": ("The cat sat on the mat.", "cat"),
    "math": ("What is two plus two?", "four"),
    "weather": ("Is it raining in the city today?", "yes"),
    "code": ("Write a function that adds numbers.", "def add(a, b): return a + b"),
    "music": ("Which instrument has keys and strings?", "piano"),
}


def dequantize(model) -> None:
    """Each bitsandbytes layer of `model` back as a float Linear holding the weights it computes with."""
    import bitsandbytes as bnb
    import torch

    for name, m in list(model.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        elif isinstance(m, bnb.nn.Linear8bitLt):
            scale = m.weight.SCB if m.weight.SCB is not None else m.state.SCB  # moved there by a forward
            w = m.weight.data.float() * scale.float()[:, None] / 127
        else:
            continue
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=False)
        lin.weight.data.copy_(w)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)


def make_dataset_file(path: Path, topic: str, n: int = 24, seed: int = 0) -> Path:
    """A small JSONL dataset whose words come mostly from one topic."""
    import json
    import random

    rng = random.Random(f"{topic}:{seed}")
    question, answer = TOPICS[topic]
    words = question.rstrip(".?").split()
    with open(path, "w") as fh:
        for i in range(n):
            rng.shuffle(words)
            fh.write(json.dumps({"input": " ".join(words) + f" {i}?", "output": [answer]}) + "\n")
    return path


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, alpha: float = 8.0, targets=("q_proj", "v_proj"),
                 use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter with random, nonzero A and B (as training would leave them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False, use_rslora=use_rslora))
    peft_model.save_pretrained(str(out))
    return out


def make_bank(root: Path, model_dir: Path, topics=tuple(TOPICS), ranks=None, alphas=None) -> Path:
    """A bank of one adapter per topic; families pair topics up so family holdout has something to do."""
    from lorablend.bank.manifest import Bank, BankEntry
    from lorablend.dataset import load_dataset, save_dataset

    root.mkdir(parents=True, exist_ok=True)
    bank = Bank.create(root, base_model=str(model_dir), tokenizer=str(model_dir))
    for i, topic in enumerate(topics):
        raw = make_dataset_file(root / f"{topic}.jsonl", topic)
        entry = BankEntry(name=topic, adapter_dir=f"adapters/{topic}", dataset=f"datasets/{topic}.jsonl.gz",
                          family=f"fam{i // 2}")
        save_dataset(load_dataset(raw, name=topic), root / entry.dataset)
        raw.unlink()
        make_adapter(model_dir, root / entry.adapter_dir, seed=i,
                     r=(ranks or {}).get(topic, 4), alpha=(alphas or {}).get(topic, 8.0))
        bank.add(entry)
    bank.save()
    return root


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory, tiny_model_dir) -> Path:
    """An indexed 5-entry bank for the tiny model (read-only: copy it before changing it)."""
    from lorablend.bank.manifest import Bank
    from lorablend.sketch import build_index

    root = make_bank(tmp_path_factory.mktemp("bank") / "bank", tiny_model_dir)
    build_index(Bank.open(root))
    return root


# --------------------------------------------------------------------------- #
# A user's dataset, and the CLI run in this process
# --------------------------------------------------------------------------- #


@pytest.fixture
def user_dataset(tmp_path):
    return make_dataset_file(tmp_path / "mine.jsonl", "math", n=20, seed=7)


def _python_default_warning_filters() -> None:
    """The filters a plain `python -m lorablend` starts with (pytest installs its own)."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.simplefilter("default", append=True)


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lorablend ARGV`, run in this process.

    Warnings a plain python run would print count as stderr lines. An exception that
    escapes `main()` (a would-be traceback) fails the test with that traceback.
    """
    from lorablend.cli import main

    capfd.readouterr()
    code = 0
    old = sys.argv
    with warnings.catch_warnings(record=True) as caught:
        _python_default_warning_filters()
        sys.argv = ["lorablend", *argv]
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = old
    out, err = capfd.readouterr()
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return code, out, err


def run_main(argv, capfd) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lorablend ARGV` in this process; ARGV may hold paths, warnings are not captured."""
    from lorablend.cli import main

    capfd.readouterr()
    old, sys.argv = sys.argv, ["lorablend", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.argv = old
    out, err = capfd.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- #
# GGUF files and the real llama.cpp client (test_gguf, test_gguf_io, test_llamacpp, test_models)
# --------------------------------------------------------------------------- #


ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def read_gguf(path):
    """(fields, tensors) of a GGUF file: key -> value (GGUF.* left out), name -> (GGML type name, array)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return fields, tensors


@pytest.fixture(scope="session")
def full_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A random LoRA on all seven linear layers of the tiny Llama (4 heads, 2 KV heads)."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("full") / "adapter", seed=3, r=4, alpha=8.0,
                        targets=ALL_MODULES)


def _write_model_gguf(path: Path, tensors: dict, fields: dict) -> Path:
    """A GGUF model file: `tensors` name -> (GGML type name, float array), quantized here; `fields` key -> (value, type)."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in fields.items():
        sub = vtype[1] if isinstance(vtype, tuple) else None
        writer.add_key_value(key, value, vtype[0] if sub else vtype, sub_type=sub)
    for name, (kind, data) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        data = data.astype(np.float32)
        if kind == "F32":
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def quantized_gguf(tmp_path_factory) -> Path:
    """A small GGUF model in the SmolLM2 wheel's mix of types (Q4_1 blocks, Q8_0 embeddings, F32 norms) + an F16 tensor."""
    from gguf import GGUFValueType as V

    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": ("Q8_0", rng.normal(size=(96, 64))),
               "blk.0.attn_norm.weight": ("F32", rng.normal(size=64)),
               "blk.0.attn_q.weight": ("Q4_1", rng.normal(size=(64, 64))),
               "blk.0.ffn_up.weight": ("F16", rng.normal(size=(128, 64)))}
    fields = {"general.name": ("tiny", V.STRING), "general.file_type": (3, V.UINT32),
              "llama.block_count": (1, V.UINT32), "llama.rope.freq_base": (100000.0, V.FLOAT32),
              "tokenizer.ggml.add_bos_token": (True, V.BOOL),
              "tokenizer.ggml.tokens": (["a", "b", "<|im_end|>"], (V.ARRAY, V.STRING)),
              "tokenizer.ggml.token_type": ([1, 1, 3], (V.ARRAY, V.INT32)),
              "tokenizer.chat_template": ("{{ messages }}", V.STRING)}
    return _write_model_gguf(tmp_path_factory.mktemp("quantized") / "q.gguf", tensors, fields)


_CONVERT = """
import runpy, sys
vendor, base_dir, base_out, lora_dir, lora_out = sys.argv[1:6]
sys.path[:0] = [vendor, vendor + "/gguf-py"]
# The tiny test tokenizer is a BPE llama.cpp's converter does not know by hash; the tests feed
# llama.cpp token ids, never text, so any pre-tokenizer name does.
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# No tokenizer.model here: skip the SentencePiece attempt (it imports sentencepiece before looking).
def _no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model")
conversion.base.TextModel._set_vocab_sentencepiece = _no_sentencepiece
for argv in (["convert_hf_to_gguf.py", base_dir, "--outfile", base_out, "--outtype", "f32"],
             ["convert_lora_to_gguf.py", "--base", base_dir, "--outfile", lora_out, "--outtype", "f32", lora_dir]):
    sys.argv = argv
    runpy.run_path(vendor + "/" + argv[0], run_name="__main__")
"""
_VENDOR_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def _vendor_dir(version: str) -> Path:
    """llama.cpp's converter scripts from the llama-cpp-python sdist (downloaded once, unpacked once)."""
    from lorablend.atomic import atomic_dir

    given = os.environ.get("LLAMA_CPP_SDIST")
    if given and Path(given).is_dir():
        found = next(Path(given).glob("**/vendor/llama.cpp/convert_lora_to_gguf.py"), None)
        if found is None:
            pytest.fail(f"LLAMA_CPP_SDIST={given} holds no vendor/llama.cpp/convert_lora_to_gguf.py")
        return found.parent
    name = f"llama_cpp_python-{version}"
    tgz = Path(given) if given else SDIST_CACHE / f"{name}.tar.gz"
    vendor = SDIST_CACHE / f"{name}-convert"
    if (vendor / "convert_lora_to_gguf.py").is_file():
        return vendor
    if not tgz.is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", str(tgz.parent)], capture_output=True, text=True)
        if proc.returncode or not tgz.is_file():
            pytest.fail(f"cannot fetch the llama-cpp-python {version} sdist for llama.cpp's converters "
                        f"({proc.stderr.strip()[-300:]}); set LLAMA_CPP_SDIST to a downloaded copy")
    prefix = f"{name}/vendor/llama.cpp/"
    try:
        with atomic_dir(vendor) as tmp, tarfile.open(tgz) as tar:
            for member in tar:
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if rel and (rel in _VENDOR_FILES or rel.startswith(_VENDOR_FILES[2:])) and member.isfile():
                    member.name = rel
                    tar.extract(member, tmp, filter="data")
    except FileExistsError:  # another session unpacked it first
        pass
    return vendor


@pytest.fixture(scope="session")
def llama_cpp():
    import llama_cpp  # the setup installs the llamacpp extra: missing, these tests fail rather than skip

    return llama_cpp


@pytest.fixture(scope="session")
def converted(llama_cpp, tiny_model_dir, full_adapter, tmp_path_factory):
    """The tiny model dir + its f32 GGUF (recorded in lorablend-source.json) and llama.cpp's export of the adapter."""
    vendor = _vendor_dir(llama_cpp.__version__)
    root = tmp_path_factory.mktemp("llamacpp")
    model = root / "tiny"
    shutil.copytree(tiny_model_dir, model)
    base, theirs = root / "tiny-f32.gguf", root / "theirs.gguf"
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(vendor), str(model), str(base), str(full_adapter),
                           str(theirs)], capture_output=True, text=True)
    assert proc.returncode == 0 and theirs.is_file(), proc.stderr[-3000:]
    (model / "lorablend-source.json").write_text(json.dumps({"gguf": str(base)}))
    return {"model": model, "base": base, "theirs": theirs, "adapter": full_adapter}


def gguf_prompts(tokenizer) -> list[list[int]]:
    """Three short prompts as token ids (the llama.cpp tests feed llama.cpp ids, never text)."""
    from lorablend.dataset import Example
    from lorablend.runtime.prompts import prompt_ids

    texts = ["The cat sat on the mat.", "What is two plus two?", "Write a function that adds numbers."]
    return [prompt_ids(tokenizer, Example(instruction="Answer briefly.", input=t, outputs=("x",))) for t in texts]


# --------------------------------------------------------------------------- #
# Bank building (test_build, test_train, test_train_step_bench)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three tasks in a tasks.json list, as `lorablend data bigbench` writes it."""
    root = tmp_path_factory.mktemp("tasks")
    listed = []
    for topic, family in (("animals", "a"), ("math", "a"), ("music", "b")):
        make_dataset_file(root / f"{topic}.jsonl", topic, n=20)
        listed.append({"name": topic, "family": family, "path": f"{topic}.jsonl"})
    (root / "tasks.json").write_text(json.dumps(listed))
    return root


# --------------------------------------------------------------------------- #
# One bench study over the tiny bank (test_bench, test_report)
# --------------------------------------------------------------------------- #


SETTINGS = (
    "tokens/js/normalized/paper/T1",
    "tokens/js/neural/paper/T1",
    "embeddings/js/normalized/svd/auto",
    "tokens/wd/attentional/svd/T1/top2",
)
FAST = dict(n=3, max_new_tokens=3, threads=1, presets=(), settings=SETTINGS)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model is fastest on one thread; restore the session's count afterwards (a module's
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def study(tiny_bank, tmp_path_factory):
    """One run over the whole tiny bank, both holdouts (shared by the read-only tests)."""
    from lorablend.bank.manifest import Bank
    from lorablend.bench.plan import BenchConfig
    from lorablend.bench.records import RecordStore
    from lorablend.bench.run import run_bench

    results = tmp_path_factory.mktemp("bench") / "results"
    run = run_bench(BenchConfig(bank=str(tiny_bank), results=results, **FAST))
    records = {(r["entry"], r["holdout"], r["label"]): r for r in RecordStore(results).all()}
    return run, records, Bank.open(tiny_bank)
