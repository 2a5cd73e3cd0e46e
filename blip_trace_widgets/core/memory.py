"""Memory: what this machine (or its container) can still give, and half-precision copies of float32
checkpoints written tensor by tensor, so that loading one in bfloat16 never holds both precisions.

    >>> from blip_trace_widgets.core.memory import available_memory
    >>> (available_memory() or 1) > 0
    True

Loading a float32 checkpoint with ``dtype="bfloat16"`` reads it whole and converts it, which
briefly holds the float32 weights and their half-precision copy. :func:`half_checkpoint` writes a
half-precision copy once (cached beside the other downloads), reading one tensor at a time, and
the model is then loaded from that copy, whose weights need no conversion.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def available_memory() -> int | None:
    """Bytes the process can still use: the container's (cgroup) limit less its usage, or Linux's
    MemAvailable, whichever is smaller; None where neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:
                found.append(int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size)), 8 + size


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype of a single-file safetensors checkpoint (None when there is none to read)."""
    path = folder / "model.safetensors"
    if not path.is_file():
        return None
    header, _ = _header(path)
    kinds = {info["dtype"] for name, info in header.items() if name != "__metadata__"}
    floats = [SAFETENSORS_DTYPES[k] for k in kinds if k in ("F32", "F16", "BF16", "F64")]
    return floats[0] if len(floats) == 1 else None


#: Bytes of half-precision copies kept (the least recently used beyond it are removed after each conversion).
HALF_CACHE_BYTES = 3 << 30


def _cache_root() -> Path:
    return Path(os.environ.get("BLIP_TRACE_CACHE") or Path.home() / ".cache" / "blip-trace-widgets") / "half"


def half_checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    """A copy of the checkpoint in ``folder`` with floating weights in ``dtype``, written one tensor at a time
    and cached by the checkpoint's path, size and time; the other files are copied as they are."""
    source = folder / "model.safetensors"
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    target = _cache_root() / f"{folder.name}-{NAMES[dtype].lower()}-{key}"
    if (target / "model.safetensors").is_file():
        os.utime(target)  # used now: pruning keeps the most recently used copies
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        for item in folder.iterdir():
            if item.is_file() and item.name != "model.safetensors":
                shutil.copy2(item, partial / item.name)
        _convert(source, partial / "model.safetensors", dtype)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    prune_half_cache(keep=target)
    return target


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def prune_half_cache(budget: int | None = None, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used half-precision copies beyond ``budget`` bytes (``BLIP_TRACE_HALF_CACHE_GB``,
    default :data:`HALF_CACHE_BYTES`: about three of BLIP-base's); never ``keep`` (the copy in use). Returns
    what was removed. To clear the cache yourself, delete ``~/.cache/blip-trace-widgets/half`` (or
    ``$BLIP_TRACE_CACHE/half``)."""
    if budget is None:
        gigabytes = os.environ.get("BLIP_TRACE_HALF_CACHE_GB")
        budget = int(float(gigabytes) * (1 << 30)) if gigabytes else HALF_CACHE_BYTES
    root = _cache_root()
    if not root.is_dir():
        return []
    copies = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".partial-")),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    removed, total = [], 0
    for copy in copies:
        total += _size(copy)
        if total > budget and copy != keep:
            shutil.rmtree(copy, ignore_errors=True)
            removed.append(copy)
    return removed


def _convert(source: Path, destination: Path, dtype: torch.dtype) -> None:
    header, base = _header(source)
    metadata = header.pop("__metadata__", None)
    out_header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    plan = []
    for name, info in header.items():
        kind = SAFETENSORS_DTYPES[info["dtype"]]
        new = dtype if kind.is_floating_point else kind
        count = 1
        for dim in info["shape"]:
            count *= dim
        size = count * torch.empty((), dtype=new).element_size()
        out_header[name] = {"dtype": NAMES[new], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        plan.append((name, info, kind, new))
        offset += size
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        writer.write(struct.pack("<Q", len(encoded)))
        writer.write(encoded)
        for _name, info, kind, new in plan:
            start, end = info["data_offsets"]
            reader.seek(base + start)
            tensor = torch.frombuffer(bytearray(reader.read(end - start)), dtype=kind) if end > start else \
                torch.empty(0, dtype=kind)
            writer.write(tensor.to(new).contiguous().view(torch.uint8).numpy().tobytes())
