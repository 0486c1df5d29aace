"""A small reader and writer of the safetensors format, so checkpoints load without unpickling.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian unsigned integer N,
then N bytes of JSON, then the tensors' raw bytes. The JSON maps each tensor's name to
`{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}` (offsets into the bytes after
the header); the optional `"__metadata__"` maps strings to strings. Tensors are written
little-endian, C-contiguous, back to back in the order given; the header is padded with spaces to
a multiple of 8 bytes. Files written here load with the `safetensors` package, and its files load
here (the dtypes below).

Loading parses JSON and copies bytes: nothing in a file can run code.
"""
from __future__ import annotations

import ctypes
import json
import struct
import sys
from pathlib import Path

import torch

from nlc.fileio import atomic_write

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024      # as the reference implementation


class SafetensorsError(ValueError):
    """Bytes that are not a well-formed safetensors file, or a tensor it cannot hold."""


def _little_endian() -> None:
    if sys.byteorder != "little":
        raise SafetensorsError("this reader and writer run on little-endian machines only")


def _raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes, C order, native (little-endian) byte order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    n = flat.numel() * flat.element_size()
    return ctypes.string_at(flat.data_ptr(), n) if n else b""


def dumps(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of `tensors` (a name -> tensor mapping, written in its order)."""
    _little_endian()
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError("metadata maps strings to strings")
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"a tensor's name is a string other than __metadata__, not {name!r}")
        if not isinstance(t, torch.Tensor) or t.dtype not in CODES:
            raise SafetensorsError(f"`{name}`: cannot store {type(t).__name__} "
                                   f"{getattr(t, 'dtype', '')} (dtypes: {', '.join(map(str, CODES))})")
        raw = _raw(t)
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def header(data: bytes) -> tuple[dict, int]:
    """The checked header of safetensors bytes and where the tensor bytes start."""
    if len(data) < 8:
        raise SafetensorsError(f"{len(data)} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise SafetensorsError(f"a header of {n} bytes does not fit in {len(data)} bytes")
    try:
        head = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError(f"the header is not JSON ({e})") from None
    if not isinstance(head, dict):
        raise SafetensorsError("the header is not a JSON object")
    meta = head.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError("__metadata__ is not a mapping of strings to strings")
    size, spans = len(data) - 8 - n, []
    for name, info in head.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
                and info["dtype"] in DTYPES and isinstance(info["shape"], list)
                and all(type(d) is int and d >= 0 for d in info["shape"])
                and isinstance(info["data_offsets"], list) and len(info["data_offsets"]) == 2
                and all(type(o) is int for o in info["data_offsets"])):
            raise SafetensorsError(f"`{name}`: not an entry {{dtype, shape, data_offsets}} of a known dtype: {info!r}")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if not 0 <= begin <= end <= size or end - begin != numel * DTYPES[info["dtype"]].itemsize:
            raise SafetensorsError(f"`{name}`: data_offsets {info['data_offsets']} do not hold "
                                   f"{info['dtype']} {info['shape']} within {size} bytes")
        spans.append((begin, end))
    at = 0
    for begin, end in sorted(spans):
        if begin != at:
            raise SafetensorsError("the tensors' bytes overlap or leave gaps")
        at = end
    if at != size:
        raise SafetensorsError(f"{size - at} bytes after the last tensor")
    return head, 8 + n


def loads(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes, in the header's order, each a new CPU tensor."""
    _little_endian()
    head, start = header(data)
    out = {}
    for name, info in head.items():
        if name == "__metadata__":
            continue
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        if begin == end:
            out[name] = torch.zeros(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(bytearray(data[start + begin:start + end]), dtype=torch.uint8)
        out[name] = raw.view(dtype).reshape(shape)
    return out


def metadata(data: bytes) -> dict[str, str]:
    return dict(header(data)[0].get("__metadata__", {}))


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically."""
    return atomic_write(path, dumps(tensors, metadata))


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    return loads(Path(path).read_bytes())
