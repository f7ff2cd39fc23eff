"""The replay buffer file: what ReplayBuffer.save() writes and load() / restore() read.

    magic  b"FURLRPB\\0"
    u32    format version (little-endian, as the next two)
    u32    header size in bytes
    u32    CRC-32 of the header
    header JSON: {"layout": {the Layout's fields..., "columns": [[name, dtype, shape], ...]},
                  "rows": slots stored per column, "crc32": [one per column]}
    data   each column's raw bytes (C order), in the order of "columns"

The columns are those of column_specs(layout), in its order; a per-slot column stores its first
`rows` slots (the slots written so far, all of them once the ring is full), the 'state' column
all of it. Version 1 files store every column in full and have no "rows"; they are still read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch

from furl_fast.replay.layout import EMBEDDING_DTYPES, Layout, column_specs

MAGIC = b"FURLRPB\x00"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
_PREFIX = len(MAGIC) + 12  # magic, version, header size, header checksum
_STATE_WRITTEN = 0  # kStateWritten: the 'state' word counting the observations written
_COLUMN_DTYPES = ("uint8", "int32", "int64", "float16", "float32")  # what column_specs() gives


class Header(NamedTuple):
    """A checked header: layout as stored, rows per per-slot column, one checksum per column."""

    layout: dict[str, Any]
    rows: int
    crcs: list[int]


def header_layout(layout: Layout, rows: int) -> dict[str, Any]:
    """The header's "layout" entry of a buffer of this layout storing `rows` slots per column."""
    entry: dict[str, Any] = {f.name: getattr(layout, f.name) for f in dataclasses.fields(Layout)}
    entry["obs_shape"] = list(layout.obs_shape)
    entry["embedding_dtype"] = EMBEDDING_DTYPES[layout.embedding_dtype]
    entry["columns"] = [
        [name, str(spec.dtype).removeprefix("torch."),
         [rows, *spec.shape[1:]] if spec.per_slot else list(spec.shape)]
        for name, spec in column_specs(layout).items()
    ]  # fmt: skip
    return entry


def _raw_bytes(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (also for empty ones, which
    memoryview.cast refuses)."""
    return memoryview(a.reshape(-1).view(np.uint8))


def save(path: str | os.PathLike, layout: Layout, columns: dict[str, torch.Tensor]) -> None:
    """Writes columns (the storage of a buffer of this layout) to path atomically: a temporary
    file in the same directory, fsync, then rename. The caller holds the buffer's write lock, so
    that no add() changes the columns between checksum and write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    specs = column_specs(layout)
    # The state column (counters, RNG) is copied: a sample() in another thread advances the RNG.
    state = columns["state"].clone()
    # Slots are written in order, so slots from `written` on were never written: they hold only
    # what a fresh buffer starts with, which load() recreates.
    rows = min(int(state[_STATE_WRITTEN]), layout.capacity)
    arrays = [
        (state if name == "state" else columns[name][:rows] if spec.per_slot else columns[name])
        .cpu()
        .numpy()
        for name, spec in specs.items()
    ]
    header = {
        "layout": header_layout(layout, rows),
        "rows": rows,
        "crc32": [zlib.crc32(_raw_bytes(a)) for a in arrays],
    }
    blob = json.dumps(header).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<III", FORMAT_VERSION, len(blob), zlib.crc32(blob)))
            f.write(blob)
            f.writelines(_raw_bytes(a) for a in arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _column_entry_ok(entry: Any) -> bool:
    """[name, dtype name, shape] as save() writes it."""
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and entry[1] in _COLUMN_DTYPES
        and isinstance(entry[2], list)
        and all(isinstance(n, int) and 0 <= n < 2**62 for n in entry[2])
    )


def read_header(f: BinaryIO, path: Path) -> Header:
    """The checked header of the open file f; rows is set for every version (1: all slots)."""
    head = f.read(_PREFIX)
    if len(head) < _PREFIX or head[: len(MAGIC)] != MAGIC:
        raise ValueError(f"ReplayBuffer.load: {path} is not a furl_fast replay buffer file.")
    version, size, crc = struct.unpack("<III", head[len(MAGIC) :])
    if version not in READ_VERSIONS:
        raise ValueError(
            f"ReplayBuffer.load: {path} has format version {version}; this furl_fast reads "
            f"versions {', '.join(map(str, READ_VERSIONS))}."
        )
    blob = f.read(size)
    if len(blob) != size or zlib.crc32(blob) != crc:
        raise ValueError(f"ReplayBuffer.load: the header of {path} is truncated or corrupted.")
    header = json.loads(blob)  # json's errors are ValueErrors
    # A header that passed its checksum may still be malformed: check its structure here so
    # that everything after it reads plain values (never a KeyError or a huge allocation).
    layout = header.get("layout") if isinstance(header, dict) else None
    columns = layout.get("columns") if isinstance(layout, dict) else None
    crcs = header.get("crc32") if isinstance(header, dict) else None
    rows = header.get("rows") if version >= 2 else layout.get("capacity") if columns else None
    if (
        not isinstance(columns, list)
        or not isinstance(crcs, list)
        or len(crcs) != len(columns)
        or not all(_column_entry_ok(e) for e in columns)
        or isinstance(rows, bool)
        or not isinstance(rows, int)
        or not 0 <= rows < 2**62
    ):
        raise ValueError(f"ReplayBuffer.load: the header of {path} has an unknown structure.")
    data_bytes = sum(math.prod(shape) * getattr(torch, dt).itemsize for _, dt, shape in columns)
    actual = os.fstat(f.fileno()).st_size
    if actual != len(head) + size + data_bytes:
        raise ValueError(
            f"ReplayBuffer.load: {path} is truncated or has trailing data: {actual} bytes, "
            f"expected {len(head) + size + data_bytes}."
        )
    return Header(layout, rows, crcs)


def check_file(path: str | os.PathLike) -> None:
    """Raises ValueError unless path holds a replay buffer file of a version this furl_fast
    reads, whole (header and size; load() verifies the data's checksums). Reads the header only."""
    path = Path(path)
    with open(path, "rb") as f:
        read_header(f, path)


def _layout_of(header: Header, path: Path) -> Layout:
    """The Layout the header describes, checked (before anything is allocated) to be one whose
    storage is exactly what the header says the file holds."""
    stored = header.layout
    try:
        values = {f.name: stored[f.name] for f in dataclasses.fields(Layout)}
        values["embedding_dtype"] = {v: k for k, v in EMBEDDING_DTYPES.items()}[
            values["embedding_dtype"]
        ]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"ReplayBuffer.load: {path} has an unknown layout ({exc!r}).") from exc
    try:
        layout = Layout(**values)
    except TypeError as exc:  # e.g. a list where the layout has a number
        raise ValueError(f"ReplayBuffer.load: {path} has an invalid layout ({exc}).") from exc
    if header.rows > layout.capacity or header_layout(layout, header.rows) != stored:
        raise ValueError(
            f"ReplayBuffer.load: {path} has a storage layout this version does not read."
        )
    return layout


def load(
    path: str | os.PathLike, allocate: Callable[[Layout], dict[str, torch.Tensor]]
) -> None:
    """Reads a file written by save(): allocate(layout) returns the storage columns of a fresh
    buffer of the file's layout (initialised, so that the slots the file does not store hold what
    they hold in a fresh buffer), and the stored rows are read into them. Raises ValueError on a
    file of another format version or layout, or a truncated, corrupted or inconsistent one."""
    path = Path(path)
    with open(path, "rb") as f:
        header = read_header(f, path)
        layout = _layout_of(header, path)
        columns = allocate(layout)
        # (The file's size matches these columns: read_header checked it against the header.)
        for (name, spec), crc in zip(column_specs(layout).items(), header.crcs):
            t = columns[name][: header.rows] if spec.per_slot else columns[name]
            host = torch.empty(t.shape, dtype=t.dtype) if t.device.type != "cpu" else t
            view = _raw_bytes(host.numpy())
            if f.readinto(view) != len(view) or zlib.crc32(view) != crc:
                raise ValueError(
                    f"ReplayBuffer.load: column '{name}' of {path} is corrupted (checksum mismatch)."
                )
            if host is not t:
                t.copy_(host)
    written = min(int(columns["state"][_STATE_WRITTEN]), layout.capacity)
    if header.rows < written:  # its missing slots would read as never written
        raise ValueError(
            f"ReplayBuffer.load: {path} is inconsistent: it stores {header.rows} slots, but "
            f"{written} were written."
        )


def check_same_layout(path: str | os.PathLike, layout: Layout) -> None:
    """Raises ValueError (naming the fields that differ) unless the file at path was written by a
    buffer of this layout."""
    path = Path(path)
    with open(path, "rb") as f:
        header = read_header(f, path)
    ours, theirs = header_layout(layout, header.rows), header.layout
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ValueError(
            f"ReplayBuffer.restore: {path} was written by a buffer of a different layout "
            f"(differs in: {', '.join(diff)})."
        )
