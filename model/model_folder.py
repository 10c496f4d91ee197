"""A model folder put together by hand: ``model.safetensors`` and ``config.json`` copied out of a
run, or written by code of the user's own, checked by what it holds rather than by the
``contents.json`` gptflow writes beside its own artifacts.

``check_model_folder`` reads the safetensors header itself (8 bytes of little-endian length, then
JSON), so that each way a copy goes wrong gets its own message: a file too short for a header, a
pickle or a ``torch.save`` zip given the name, a header that is no JSON, tensors that run past the
end of the file (a truncated copy) or leave bytes after it, and tensors whose names or shapes are
not those of the GPT that ``config.json`` describes (weights of another model size). Every failure
is a ``ModelFolderError``: one line naming the file and what is wrong with it. The weights
themselves are not read: a model of gigabytes is checked in milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from gptflow.data.errors import UserError
from gptflow.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
"""Bytes per element of each safetensors dtype."""
MAX_HEADER_BYTES = 100 * 2**20
"""The largest header the safetensors library itself reads."""
HEADER_LENGTH_BYTES = 8
_FIX_WEIGHTS = "Copy it again from where it was saved, or save the weights with safetensors.torch.save_model"


class ModelFolderError(UserError):
    """A model folder whose weights cannot be read as the model its config describes; the message
    names the file and what is wrong with it."""


def check_model_folder(directory: Path, config: ModelConfig) -> None:
    """Raise ``ModelFolderError`` unless ``directory``'s ``model.safetensors`` is a whole
    safetensors file holding every weight of the GPT of ``config``, each with its shape."""
    weights = Path(directory) / WEIGHTS_FILE
    shapes = read_tensor_shapes(weights)
    with torch.device("meta"):  # the model's tensor names and shapes, without allocating its weights
        model = GPT(config)
    expected: dict[str, list[int]] = {}
    tied: dict[int, list[str]] = {}  # a weight shared by several names is stored under one of them
    for name, tensor in model.state_dict(keep_vars=True).items():
        expected[name] = list(tensor.shape)
        tied.setdefault(id(tensor), []).append(name)
    fits = (f"does not fit {Path(directory) / CONFIG_FILE} (n_layer={config.n_layer}, n_embd={config.n_embd}, "
            f"vocab_size={config.vocab_size})")
    fix = f"put the {CONFIG_FILE} saved with these weights beside them"
    wrong = [name for name in sorted(shapes.keys() & expected.keys()) if shapes[name] != expected[name]]
    if wrong:
        name = wrong[0]
        raise ModelFolderError(f"{weights} {fits}: {name} is {shapes[name]} in the file, {expected[name]} for the "
                               f"config ({len(wrong)} of {len(shapes)} tensors differ); {fix}.")
    missing = [names[0] for names in tied.values() if not any(name in shapes for name in names)]
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        found = [f"{len(missing)} tensors missing ({_first(missing)})"] if missing else []
        found += [f"{len(unexpected)} tensors no such GPT has ({_first(unexpected)})"] if unexpected else []
        raise ModelFolderError(f"{weights} {fits}: {'; '.join(found)}; {fix}, or weights gptflow saved.")


def read_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's name and shape, from the header of the safetensors file at ``path``, whose
    tensors must fill the file exactly; ``ModelFolderError`` otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise ModelFolderError(f"{path} is not a safetensors file: it holds {size} bytes, fewer than the "
                                   f"{HEADER_LENGTH_BYTES} that give its header's length. {_FIX_WEIGHTS}.")
        header_length = int.from_bytes(prefix, "little")
        if header_length > min(size - HEADER_LENGTH_BYTES, MAX_HEADER_BYTES):
            raise ModelFolderError(
                f"{path} is not a safetensors file{_format_of(prefix)}: its first 8 bytes give a header of "
                f"{header_length:,} bytes, and the file holds {size:,}. {_FIX_WEIGHTS}.")
        try:
            header = json.loads(stream.read(header_length))
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path} is not a safetensors file: its header is not a JSON object. {_FIX_WEIGHTS}.")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    data_bytes = size - HEADER_LENGTH_BYTES - header_length
    end = 0
    for name, entry in tensors.items():
        if not _is_tensor_entry(entry):
            raise ModelFolderError(f"{path} is not a safetensors file: its header's entry {name!r} is no tensor "
                                   f"(dtype, shape, data_offsets). {_FIX_WEIGHTS}.")
        end = max(end, entry["data_offsets"][1])
    if end > data_bytes:
        raise ModelFolderError(f"{path} is truncated: its tensors end at byte {end:,} of its data, which holds "
                               f"{data_bytes:,}. {_FIX_WEIGHTS}.")
    if end < data_bytes:
        raise ModelFolderError(f"{path} holds {data_bytes - end:,} bytes after its last tensor: it was altered or "
                               f"appended to. {_FIX_WEIGHTS}.")
    return {name: list(entry["shape"]) for name, entry in tensors.items()}


def _is_tensor_entry(entry: Any) -> bool:
    """A header entry with a known dtype, a shape of sizes and the byte range that shape takes."""
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(size, int) and size >= 0 for size in shape)):
        return False
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(offset, int) for offset in offsets)):
        return False
    begin, end = offsets
    return 0 <= begin <= end and end - begin == math.prod(shape) * DTYPE_BYTES[entry["dtype"]]


def _format_of(prefix: bytes) -> str:
    """What a file that is no safetensors file seems to be, from its first bytes."""
    if prefix.startswith(b"PK\x03\x04"):
        return " (it is a zip archive, as torch.save writes)"
    if prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return " (it is a Python pickle)"
    return ""


def _first(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
