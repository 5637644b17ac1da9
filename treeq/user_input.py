"""Checks on what a user hands treeq (devices, model and checkpoint directories, weights, the Python
API's arguments), each failing with one line that names the problem and the fix instead of a
traceback from deep inside torch or transformers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import TreeqError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def device(name: str) -> torch.device:
    """``name`` as a device this machine has."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TreeqError(f"device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TreeqError(f"device {name!r}: this torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise TreeqError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        raise TreeqError(f"device {name!r}: treeq runs on cpu or cuda")
    return dev


def local_path(value, what: str) -> Path:
    """``value`` as a Path where it is a str or os.PathLike; anything else handed where a path
    belongs is named in one line (Path() would fail deep in pathlib)."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise TreeqError(f"{what} must be a path (a str or pathlib.Path), got {type(value).__name__}")


def loaded_model(model, call: str):
    """``model`` if it is a loaded transformers model, as treeq.load and treeq.load_fp_model return."""
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return model
    load_first = isinstance(model, (str, os.PathLike))
    hint = "; load it first: model, tokenizer = treeq.load(path) (or treeq.load_fp_model(path))" if load_first else ""
    raise TreeqError(f"{call} takes a loaded transformers model, got {type(model).__name__}{hint}")


def loaded_tokenizer(tokenizer, call: str):
    """``tokenizer`` if it tokenizes, as the second value of treeq.load and treeq.load_fp_model."""
    if callable(tokenizer) and hasattr(tokenizer, "decode"):
        return tokenizer
    raise TreeqError(
        f"{call} needs the model's tokenizer (the second value treeq.load and treeq.load_fp_model return), "
        f"got {type(tokenizer).__name__}"
    )


def tokens_fit(model, ids: torch.Tensor | list[torch.Tensor]) -> None:
    """Every token id (a tensor, or a list of batches) names a row of ``model``'s input embedding:
    a tokenizer that is not the model's own gives ids beyond it, which end in torch's IndexError
    deep inside the forward."""
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)  # None: not a table of rows
    if rows is None:
        return
    largest = max((int(t.max()) for t in ([ids] if isinstance(ids, torch.Tensor) else ids) if t.numel()), default=-1)
    if largest >= rows:
        raise TreeqError(
            f"the tokenizer gives token id {largest}, but the model's embedding has {rows} rows: its tokenizer "
            "files are not this model's; use the tokenizer the model was trained with"
        )


def positions(model) -> int | None:
    """The positions the model states it was trained on (max_position_embeddings), where it states them."""
    stated = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return stated if isinstance(stated, int) else None


def beyond_positions(model, seqlen: int) -> str | None:
    """A warning where windows of ``seqlen`` tokens are longer than the positions the model states,
    for the runs that allow them (evaluation, statistics); None where they fit."""
    trained = positions(model)
    if trained is None or seqlen <= trained:
        return None
    return f"windows of {seqlen} tokens are longer than the model's {trained} positions"


def whole_number(value, name: str, minimum: int, below: str | None = None) -> int:
    """An integer argument of the Python API, held to the bound its CLI option has; ``below``: what
    an integer under ``minimum`` would mean, for the message."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TreeqError(f"{name}={value!r} must be an integer >= {minimum}")
    if value < minimum:
        raise TreeqError(f"{name}={value} {below}" if below else f"{name}={value} must be an integer >= {minimum}")
    return value


def listed(values, name: str):
    """``values`` where a list (or tuple) of settings belongs; one string or number is refused rather
    than read letter by letter."""
    if isinstance(values, (str, int, float)):
        raise TreeqError(f"{name} must be a list, got {type(values).__name__} {values!r}: e.g. {name}=[{values!r}]")
    return values


def new_output_dir(out: Path) -> Path:
    """``out`` as a directory a run can create: absent, and :func:`writable_dir`."""
    if out.exists():
        raise TreeqError(f"output directory {out} already exists; choose another --out or remove it")
    return writable_dir(out)


def writable_dir(out: Path) -> Path:
    """``out`` as a directory this process can write into, existing or to be made: tried at once with
    a throwaway directory in it or its nearest existing parent, so a run fails before any work, not at
    its first write."""
    base = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not base.is_dir():
        raise TreeqError(f"cannot write to {out}: {base} is a file; choose another --out")
    try:
        Path(tempfile.mkdtemp(prefix=".treeq-probe-", dir=base)).rmdir()
    except OSError as e:
        why = e.strerror
        raise TreeqError(f"cannot write to {out} in {base} ({why}); choose another --out") from None
    return out


def tokenizer_dir(path: Path) -> Path:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TreeqError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
            "there (tokenizer.save_pretrained(DIR))"
        )
    return path


def model_weights_dir(path: Path) -> Path:
    """``path`` if it holds weight files transformers reads (safetensors or PyTorch's .bin)."""
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise TreeqError(
            f"{path} has no weight files (model*.safetensors or pytorch_model*.bin); copy the model's weights there"
        )
    return path


def unreadable_weights(path: Path, error: Exception) -> TreeqError:
    """The error for weights that cannot be read: truncated, corrupt, or not safetensors."""
    return TreeqError(f"{path}: its weights cannot be read ({error}); the file is truncated or corrupt, copy it again")


READ_ERRORS = (SafetensorError, OSError, EOFError)


def json_file(path: Path) -> dict:
    """A JSON settings file of a model or checkpoint directory (config.json, quantize_config.json),
    or one line naming the file when it is not JSON (transformers' own message blames the model)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno}"
        raise TreeqError(f"{path} is not valid JSON ({where}); the file is corrupt, copy it again") from None
    except UnicodeDecodeError:
        raise TreeqError(f"{path} is not a text file; the file is corrupt, copy it again") from None


def quantization_config(path: Path) -> dict | None:
    """The quantization_config that a model directory's config.json carries (a quantized
    checkpoint's, whichever tool wrote it), or None for a full-precision model."""
    return json_file(path / "config.json").get("quantization_config")


def finite_weight(name: str, weight: torch.Tensor) -> None:
    """Quantizing NaN or Inf would silently lose the module; name it instead."""
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise TreeqError(f"{name} has {bad} NaN or Inf weights; fix or re-save the model before quantizing it")


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` as one a model runs in."""
    if dtype not in FLOAT_DTYPES:
        allowed = ", ".join(map(str, FLOAT_DTYPES))
        raise TreeqError(f"dtype {dtype} is not one a model runs in; use one of {allowed}")
    return dtype


def resolve_device(name: str | None) -> torch.device:
    """None or "auto": the GPU where there is one, else the CPU; any other name as :func:`device`."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device(str(name))


def parse_devices(devices: str | list[str] | None) -> list[torch.device] | None:
    if devices is None:
        return None
    names = devices.split(",") if isinstance(devices, str) else devices
    return [device(n.strip()) for n in names]
