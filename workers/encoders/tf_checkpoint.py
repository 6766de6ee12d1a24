"""A reader of TensorFlow checkpoint bundles (TF >= 0.12 "V2" format) that needs no TensorFlow.

A bundle is `<prefix>.index` plus one or more `<prefix>.data-NNNNN-of-NNNNN` shards. The index is a
LevelDB-format sorted string table: a fixed 48-byte footer points at an index block whose entries point at data
blocks; each block holds prefix-compressed key/value entries, a restart array, and a 5-byte trailer with a
masked crc32c. The key "" maps to a `BundleHeaderProto`; every other key is a tensor name mapped to a
`BundleEntryProto` (dtype, shape, shard, offset, size, masked crc32c of the tensor's bytes). The data shards
hold the raw little-endian tensors at those offsets.

Everything is checked: block checksums, the restart array, key order, entry bounds and every tensor's checksum,
so a corrupt or truncated file raises `WeightsError` instead of yielding wrong weights.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catalog_embed.schemas.errors import WeightsError

__all__ = ["TensorEntry", "crc32c", "load_checkpoint", "read_checkpoint", "read_index"]

_FOOTER_SIZE = 48
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_SIZE = 5
_CRC_MASK_DELTA = 0xA282EAD8

# TensorFlow's DataType enum values (types.proto) for the dense numeric types a checkpoint of weights holds.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    19: np.dtype("<f2"),  # DT_HALF
}


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of `data`, as LevelDB and TensorFlow compute it.

    Pure Python, one table lookup per byte (about 8 MB/s): checkpoints are converted once and then cached.
    """
    table = _CRC_TABLE
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes | memoryview) -> int:
    # LevelDB stores CRCs rotated and offset so a CRC of data that embeds CRCs stays well distributed.
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the data shards, as the index describes it.

    Attributes:
        name: the variable name (the index key).
        dtype_code: TensorFlow's DataType enum value.
        dtype: numpy dtype of the stored values (little-endian); None for types this reader cannot decode
            (strings, complex, quantized), which can be listed but not read.
        shape: the tensor's shape; () for a scalar.
        shard: index of the data shard holding the bytes.
        offset: byte offset in that shard.
        size: number of bytes.
        crc32c: masked crc32c of those bytes, as stored.
    """

    name: str
    dtype_code: int
    dtype: np.dtype | None
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int


class _Reader:
    """A cursor over bytes that turns every overrun into a WeightsError naming what was being read."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def varint(self) -> int:
        result = 0
        for shift in range(0, 70, 7):
            if self.pos >= len(self.data):
                msg = f"{self.what}: truncated varint at byte {self.pos}"
                raise WeightsError(msg)
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result & 0xFFFFFFFFFFFFFFFF
        msg = f"{self.what}: varint longer than 10 bytes at byte {self.pos}"
        raise WeightsError(msg)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            msg = f"{self.what}: needs {n} bytes at byte {self.pos}, only {len(self.data) - self.pos} left"
            raise WeightsError(msg)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def fixed32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def fixed64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]


def _proto_fields(data: bytes | memoryview, what: str) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) of a serialised protobuf message.

    Varints come back as unsigned 64-bit ints, fixed32/fixed64 as ints, length-delimited fields as bytes; the
    deprecated group wire types never occur in checkpoint protos and are rejected.
    """
    reader = _Reader(data, what)
    while not reader.at_end():
        tag = reader.varint()
        number, wire = tag >> 3, tag & 7
        if number == 0:
            msg = f"{what}: protobuf field number 0 at byte {reader.pos}"
            raise WeightsError(msg)
        if wire == 0:
            yield number, wire, reader.varint()
        elif wire == 1:
            yield number, wire, reader.fixed64()
        elif wire == 2:
            yield number, wire, reader.take(reader.varint())
        elif wire == 5:
            yield number, wire, reader.fixed32()
        else:
            msg = f"{what}: unsupported protobuf wire type {wire} for field {number}"
            raise WeightsError(msg)


def _expect_wire(what: str, number: int, wire: int, expected: int) -> None:
    if wire != expected:
        msg = f"{what}: field {number} has wire type {wire}, expected {expected}"
        raise WeightsError(msg)


def _parse_shape(data: memoryview, what: str) -> tuple[int, ...]:
    # TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1, string name = 2); bool unknown_rank = 3.
    dims = []
    for number, wire, value in _proto_fields(data, what):
        if number == 2:
            _expect_wire(what, number, wire, 2)
            size = 0
            for dim_number, dim_wire, dim_value in _proto_fields(value, what):
                if dim_number == 1:
                    _expect_wire(what, dim_number, dim_wire, 0)
                    size = dim_value
            if size >= 1 << 63:
                msg = f"{what}: negative dimension (unknown size) in a saved tensor"
                raise WeightsError(msg)
            dims.append(size)
        elif number == 3 and value:
            msg = f"{what}: shape of unknown rank in a saved tensor"
            raise WeightsError(msg)
    return tuple(dims)


def _parse_entry(name: str, data: memoryview) -> TensorEntry:
    what = f"index entry {name!r}"
    dtype_code = shard = offset = size = 0
    shape: tuple[int, ...] = ()
    crc: int | None = None
    for number, wire, value in _proto_fields(data, what):
        if number == 1:
            _expect_wire(what, number, wire, 0)
            dtype_code = value
        elif number == 2:
            _expect_wire(what, number, wire, 2)
            shape = _parse_shape(value, what)
        elif number == 3:
            _expect_wire(what, number, wire, 0)
            shard = value
        elif number == 4:
            _expect_wire(what, number, wire, 0)
            offset = value
        elif number == 5:
            _expect_wire(what, number, wire, 0)
            size = value
        elif number == 6:
            _expect_wire(what, number, wire, 5)
            crc = value
        elif number == 7:
            msg = f"{what}: partitioned (sliced) variables are not supported"
            raise WeightsError(msg)
    if crc is None:
        msg = f"{what}: no crc32c recorded"
        raise WeightsError(msg)
    dtype = _DTYPES.get(dtype_code)
    if dtype is not None and size != (expected := math.prod(shape) * dtype.itemsize):
        msg = f"{what}: {size} bytes stored for shape {shape} of {dtype}, expected {expected}"
        raise WeightsError(msg)
    return TensorEntry(name, dtype_code, dtype, shape, shard, offset, size, crc)


def _parse_header(data: memoryview) -> int:
    # BundleHeaderProto: int32 num_shards = 1; Endianness endianness = 2 (0 little, 1 big); VersionDef version = 3.
    what = "index header"
    num_shards, endianness = 1, 0
    for number, wire, value in _proto_fields(data, what):
        if number == 1:
            _expect_wire(what, number, wire, 0)
            num_shards = value
        elif number == 2:
            _expect_wire(what, number, wire, 0)
            endianness = value
    if endianness != 0:
        msg = f"{what}: big-endian checkpoints are not supported"
        raise WeightsError(msg)
    if not 1 <= num_shards < 1 << 31:
        msg = f"{what}: invalid shard count {num_shards}"
        raise WeightsError(msg)
    return num_shards


def _block_handle(reader: _Reader) -> tuple[int, int]:
    return reader.varint(), reader.varint()


def _read_block(index: memoryview, handle: tuple[int, int], what: str) -> memoryview:
    offset, size = handle
    end = offset + size + _BLOCK_TRAILER_SIZE
    if end > len(index) - _FOOTER_SIZE:
        msg = f"{what}: block at {offset}+{size} runs past the end of the index ({len(index)} bytes)"
        raise WeightsError(msg)
    contents = index[offset : offset + size]
    compression = index[offset + size]
    stored = struct.unpack("<I", index[offset + size + 1 : end])[0]
    # The checksum covers the contents and the compression byte.
    if _masked_crc32c(index[offset : offset + size + 1]) != stored:
        msg = f"{what}: checksum mismatch in the block at byte {offset}: the index file is corrupt"
        raise WeightsError(msg)
    if compression != 0:
        msg = f"{what}: block at byte {offset} is compressed (type {compression}); only uncompressed is supported"
        raise WeightsError(msg)
    return contents


def _block_entries(block: memoryview, what: str) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (key, value) of a table block, undoing the prefix compression and checking the restart array."""
    if len(block) < 4:
        msg = f"{what}: block of {len(block)} bytes is too short for its restart count"
        raise WeightsError(msg)
    num_restarts = struct.unpack("<I", block[-4:])[0]
    entries_end = len(block) - 4 * (num_restarts + 1)
    if num_restarts == 0 or entries_end < 0:
        msg = f"{what}: block claims {num_restarts} restart points, which do not fit in {len(block)} bytes"
        raise WeightsError(msg)
    restarts = struct.unpack(f"<{num_restarts}I", block[entries_end:-4])
    if restarts[0] != 0 or any(b <= a for a, b in zip(restarts, restarts[1:], strict=False)):
        msg = f"{what}: restart array {restarts[:8]}... is not strictly increasing from 0"
        raise WeightsError(msg)
    if entries_end == 0:
        # An empty block still carries the single restart point 0.
        if restarts != (0,):
            msg = f"{what}: empty block with restart array {restarts[:8]}"
            raise WeightsError(msg)
        return
    reader = _Reader(block[:entries_end], what)
    key = b""
    seen_restarts = 0
    while not reader.at_end():
        entry_start = reader.pos
        shared, unshared, value_len = reader.varint(), reader.varint(), reader.varint()
        is_restart = seen_restarts < num_restarts and restarts[seen_restarts] == entry_start
        if is_restart:
            seen_restarts += 1
            if shared != 0:
                msg = f"{what}: entry at restart point {entry_start} shares {shared} key bytes, expected 0"
                raise WeightsError(msg)
        if shared > len(key):
            msg = f"{what}: entry at byte {entry_start} shares {shared} bytes of a {len(key)}-byte key"
            raise WeightsError(msg)
        new_key = key[:shared] + bytes(reader.take(unshared))
        if entry_start > 0 and new_key <= key:
            msg = f"{what}: keys out of order at byte {entry_start} ({key!r} then {new_key!r})"
            raise WeightsError(msg)
        key = new_key
        yield key, reader.take(value_len)
    if seen_restarts != num_restarts:
        msg = f"{what}: {num_restarts - seen_restarts} restart points do not start an entry"
        raise WeightsError(msg)


def read_index(index: bytes) -> tuple[int, dict[str, TensorEntry]]:
    """Parse a checkpoint's `.index` file.

    Args:
        index: the whole `.index` file.

    Returns:
        The number of data shards, and every tensor's entry by name, in key order.

    Raises:
        WeightsError: the file is not a checkpoint index, is truncated, or fails a checksum.
    """
    view = memoryview(index)
    if len(view) < _FOOTER_SIZE:
        msg = f"checkpoint index of {len(view)} bytes is shorter than its {_FOOTER_SIZE}-byte footer"
        raise WeightsError(msg)
    footer = _Reader(view[-_FOOTER_SIZE:], "index footer")
    metaindex_handle = _block_handle(footer)
    index_handle = _block_handle(footer)
    if struct.unpack("<Q", view[-8:])[0] != _TABLE_MAGIC:
        msg = "index footer: bad magic number: not a TensorFlow checkpoint index (or truncated)"
        raise WeightsError(msg)
    # TensorFlow writes no filters, so the metaindex block holds nothing we need; it is still checksummed and
    # parsed so that a corrupt footer or block is caught.
    for _ in _block_entries(_read_block(view, metaindex_handle, "metaindex block"), "metaindex block"):
        pass
    num_shards: int | None = None
    entries: dict[str, TensorEntry] = {}
    last_key: bytes | None = None
    for separator, handle_bytes in _block_entries(_read_block(view, index_handle, "index block"), "index block"):
        handle_reader = _Reader(handle_bytes, "index block handle")
        handle = _block_handle(handle_reader)
        what = f"data block at byte {handle[0]}"
        for key, value in _block_entries(_read_block(view, handle, what), what):
            if last_key is not None and key <= last_key:
                msg = f"{what}: key {key!r} does not follow {last_key!r}"
                raise WeightsError(msg)
            if key > separator:
                msg = f"{what}: key {key!r} lies beyond its index separator {separator!r}"
                raise WeightsError(msg)
            last_key = key
            if key == b"":
                num_shards = _parse_header(value)
                continue
            try:
                name = key.decode()
            except UnicodeDecodeError as exc:
                msg = f"{what}: tensor name {key!r} is not UTF-8"
                raise WeightsError(msg) from exc
            entries[name] = _parse_entry(name, value)
    if num_shards is None:
        msg = "checkpoint index has no header entry: not a TensorFlow V2 checkpoint"
        raise WeightsError(msg)
    for entry in entries.values():
        if entry.shard >= num_shards:
            msg = f"index entry {entry.name!r}: shard {entry.shard} of a {num_shards}-shard checkpoint"
            raise WeightsError(msg)
    return num_shards, entries


def read_checkpoint(
    index: bytes,
    shards: Sequence[bytes],
    include: Callable[[str], bool] | None = None,
) -> dict[str, np.ndarray]:
    """Read tensors from a checkpoint held in memory.

    Args:
        index: the `.index` file.
        shards: the `.data-NNNNN-of-NNNNN` files, in shard order.
        include: selects tensors by name (e.g. to skip optimizer slots); all tensors when None. Only selected
            tensors are read and checksummed.

    Returns:
        name -> array with the stored shape, in key order. Floating-point tensors come back as float32 (what
        PyTorch weights want), other types as stored.

    Raises:
        WeightsError: a file is corrupt or truncated, a checksum fails, or the shard count is wrong.
    """
    num_shards, entries = read_index(index)
    if len(shards) != num_shards:
        msg = f"checkpoint has {num_shards} data shard(s), {len(shards)} given"
        raise WeightsError(msg)
    tensors: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        if include is not None and not include(name):
            continue
        if entry.dtype is None:
            msg = f"tensor {name!r}: TensorFlow dtype code {entry.dtype_code} cannot be read as a numeric array"
            raise WeightsError(msg)
        shard = memoryview(shards[entry.shard])
        if entry.offset + entry.size > len(shard):
            msg = (
                f"tensor {name!r}: bytes {entry.offset}..{entry.offset + entry.size} lie beyond the end of "
                f"data shard {entry.shard} ({len(shard)} bytes): the data file is truncated"
            )
            raise WeightsError(msg)
        raw = shard[entry.offset : entry.offset + entry.size]
        if _masked_crc32c(raw) != entry.crc32c:
            msg = f"tensor {name!r}: checksum mismatch: the data file is corrupt"
            raise WeightsError(msg)
        array = np.frombuffer(raw, dtype=entry.dtype).reshape(entry.shape)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        else:
            array = array.astype(array.dtype.newbyteorder("="))
        tensors[name] = array
    return tensors


def load_checkpoint(
    prefix: str | os.PathLike[str], include: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """Read tensors from a checkpoint on disk, given its prefix (the path without `.index`).

    See `read_checkpoint` for `include`, the result and the errors.
    """
    prefix = os.fspath(prefix)
    try:
        index = Path(f"{prefix}.index").read_bytes()
        num_shards, _ = read_index(index)
        shards = [Path(f"{prefix}.data-{i:05d}-of-{num_shards:05d}").read_bytes() for i in range(num_shards)]
    except OSError as exc:
        msg = f"cannot read checkpoint {prefix!r}: {exc}"
        raise WeightsError(msg) from exc
    return read_checkpoint(index, shards, include)
