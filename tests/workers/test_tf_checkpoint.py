"""Our TensorFlow checkpoint reader on the real musicnn checkpoints, and on corrupted copies of them.

The checkpoints come from the sha256-pinned musicnn wheel: fetched from PyPI on first use into the default weights
cache, offline afterwards.
"""

from __future__ import annotations

import struct
import zipfile

import numpy as np
import pytest

from catalog_embed.schemas.errors import WeightsError
from catalog_embed.workers.encoders.musicnn import WHEEL_FILENAME, WHEEL_PROJECT, WHEEL_SHA256, WHEEL_VERSION
from catalog_embed.workers.encoders.tf_checkpoint import crc32c, load_checkpoint, read_checkpoint, read_index
from catalog_embed.workers.encoders.weights import fetch_pypi_wheel

# The 64 model variables of a musicnn checkpoint (MSD and MTT alike) and their TensorFlow shapes.
_BN_WIDTHS = {"": 1, "_1": 204, "_2": 204, "_3": 51, "_4": 51, "_5": 51, "_6": 64, "_7": 64, "_8": 64,
              "_9": 1506, "_10": 200}  # fmt: skip
_KERNELS = {
    "conv2d": (7, 38, 1, 204),
    "conv2d_1": (7, 67, 1, 204),
    "conv2d_2": (128, 1, 1, 51),
    "conv2d_3": (64, 1, 1, 51),
    "conv2d_4": (32, 1, 1, 51),
    "conv2d_5": (7, 561, 1, 64),
    "conv2d_6": (7, 64, 1, 64),
    "conv2d_7": (7, 64, 1, 64),
    "dense": (1506, 200),
    "dense_1": (200, 50),
}
EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    **{f"batch_normalization{suffix}/{var}": (width,) for suffix, width in _BN_WIDTHS.items()
       for var in ("beta", "gamma", "moving_mean", "moving_variance")},
    **{f"{scope}/kernel": shape for scope, shape in _KERNELS.items()},
    **{f"{scope}/bias": (shape[-1],) for scope, shape in _KERNELS.items()},
}  # fmt: skip


def is_model_variable(name: str) -> bool:
    return not name.endswith(("/Adam", "/Adam_1")) and not name.endswith("_power")


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, tuple[bytes, bytes]]:
    """variant -> (.index bytes, .data bytes), read from the pinned wheel."""
    wheel = fetch_pypi_wheel(WHEEL_PROJECT, WHEEL_VERSION, WHEEL_FILENAME, WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as archive:
        return {
            variant: (
                archive.read(f"musicnn/{variant}_musicnn/.index"),
                archive.read(f"musicnn/{variant}_musicnn/.data-00000-of-00001"),
            )
            for variant in ("MSD", "MTT")
        }


def test_crc32c_matches_the_standard_check_values() -> None:
    # The CRC-32C check value, and the all-zeros vector of RFC 3720 (iSCSI) B.4.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"") == 0


@pytest.mark.parametrize("variant", ["MSD", "MTT"])
def test_reads_the_64_model_variables(checkpoints: dict[str, tuple[bytes, bytes]], variant: str) -> None:
    index, data = checkpoints[variant]
    tensors = read_checkpoint(index, [data], include=is_model_variable)
    assert len(tensors) == 64
    assert sum(t.size for t in tensors.values()) == 792_079
    assert {name: t.shape for name, t in tensors.items()} == EXPECTED_SHAPES
    assert list(tensors) == sorted(tensors)
    for name, tensor in tensors.items():
        assert tensor.dtype == np.float32, name
        assert np.isfinite(tensor).all(), name
    assert (tensors["batch_normalization_9/moving_variance"] >= 0).all()
    assert tensors["conv2d/kernel"].std() > 0


def test_index_lists_optimizer_state_and_one_shard(checkpoints: dict[str, tuple[bytes, bytes]]) -> None:
    index, data = checkpoints["MSD"]
    num_shards, entries = read_index(index)
    assert num_shards == 1
    # 42 trainable variables carry two Adam slots each; Adam's two beta powers are scalars.
    assert len(entries) == 64 + 2 * 42 + 2
    assert entries["beta1_power"].shape == ()
    assert entries["dense/kernel/Adam_1"].shape == (1506, 200)
    end = max(entry.offset + entry.size for entry in entries.values())
    assert end == len(data)
    everything = read_checkpoint(index, [data])
    assert len(everything) == len(entries)


def test_variants_differ(checkpoints: dict[str, tuple[bytes, bytes]]) -> None:
    msd = read_checkpoint(*_split(checkpoints["MSD"]), include=lambda name: name == "dense_1/kernel")
    mtt = read_checkpoint(*_split(checkpoints["MTT"]), include=lambda name: name == "dense_1/kernel")
    assert not np.array_equal(msd["dense_1/kernel"], mtt["dense_1/kernel"])


def _split(checkpoint: tuple[bytes, bytes]) -> tuple[bytes, list[bytes]]:
    return checkpoint[0], [checkpoint[1]]


def _flip(blob: bytes, position: int) -> bytes:
    corrupt = bytearray(blob)
    corrupt[position] ^= 0x01
    return bytes(corrupt)


def test_flipped_byte_in_a_tensor_raises(checkpoints: dict[str, tuple[bytes, bytes]]) -> None:
    index, data = checkpoints["MSD"]
    _, entries = read_index(index)
    kernel = entries["dense/kernel"]
    corrupt = _flip(data, kernel.offset + kernel.size // 2)
    with pytest.raises(WeightsError, match="'dense/kernel': checksum mismatch"):
        read_checkpoint(index, [corrupt], include=is_model_variable)


def test_corruption_outside_the_selected_tensors_is_not_read(checkpoints: dict[str, tuple[bytes, bytes]]) -> None:
    index, data = checkpoints["MSD"]
    _, entries = read_index(index)
    slot = entries["dense/kernel/Adam"]
    corrupt = _flip(data, slot.offset)
    assert len(read_checkpoint(index, [corrupt], include=is_model_variable)) == 64
    with pytest.raises(WeightsError, match="'dense/kernel/Adam': checksum mismatch"):
        read_checkpoint(index, [corrupt], include=lambda name: name == "dense/kernel/Adam")


def test_flipped_byte_anywhere_in_the_index_blocks_raises(checkpoints: dict[str, tuple[bytes, bytes]]) -> None:
    index, data = checkpoints["MSD"]
    footer = 48
    # Every block byte, trailer included, is covered by a block checksum; spread the flips over all of them.
    for position in range(0, len(index) - footer, 37):
        with pytest.raises(WeightsError):
            read_checkpoint(_flip(index, position), [data], include=is_model_variable)


@pytest.mark.parametrize(
    ("position", "match"),
    [(-1, "bad magic"), (-8, "bad magic"), (-48, "metaindex block"), (-45, "index block")],
)
def test_corrupt_footer_raises(checkpoints: dict[str, tuple[bytes, bytes]], position: int, match: str) -> None:
    index, _ = checkpoints["MSD"]
    with pytest.raises(WeightsError, match=match):
        read_index(_flip(index, len(index) + position))


def test_truncated_files_raise(checkpoints: dict[str, tuple[bytes, bytes]]) -> None:
    index, data = checkpoints["MSD"]
    with pytest.raises(WeightsError):
        read_index(index[:-1])
    with pytest.raises(WeightsError, match="shorter than its 48-byte footer"):
        read_index(index[-20:])
    with pytest.raises(WeightsError, match="truncated"):
        read_checkpoint(index, [data[: len(data) // 2]])
    with pytest.raises(WeightsError, match="1 data shard"):
        read_checkpoint(index, [data, data])


def test_load_checkpoint_from_disk(checkpoints: dict[str, tuple[bytes, bytes]], tmp_path) -> None:
    index, data = checkpoints["MTT"]
    (tmp_path / "model.index").write_bytes(index)
    (tmp_path / "model.data-00000-of-00001").write_bytes(data)
    from_disk = load_checkpoint(tmp_path / "model", include=is_model_variable)
    in_memory = read_checkpoint(index, [data], include=is_model_variable)
    assert from_disk.keys() == in_memory.keys()
    for name in in_memory:
        np.testing.assert_array_equal(from_disk[name], in_memory[name])
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "missing")


# A minimal writer of checkpoint bundles, to reach what the real checkpoints lack: several data blocks, several
# shards, other dtypes, tensors this reader cannot decode.
_DTYPE_CODES = {np.dtype("<f4"): 1, np.dtype("<f8"): 2, np.dtype("<i8"): 9, np.dtype("<f2"): 19}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes, wire: int = 0) -> bytes:
    if wire == 2:
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if wire == 5:
        return _varint(number << 3 | 5) + struct.pack("<I", value)
    return _varint(number << 3) + _varint(value)


def _masked(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _table_block(entries: list[tuple[bytes, bytes]], restart_interval: int = 2) -> bytes:
    body, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(body))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        body += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(body) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def write_bundle(
    tensors: dict[str, np.ndarray | bytes], shards: int = 2, per_block: int = 3
) -> tuple[bytes, list[bytes]]:
    """(index, data shards) of a checkpoint holding `tensors` in their order; bytes are stored as DT_STRING."""
    data = [bytearray() for _ in range(shards)]
    entries = [(b"", _field(1, shards))]
    for i, (name, value) in enumerate(tensors.items()):
        shard = i % shards
        raw = value if isinstance(value, bytes) else value.tobytes()
        shape = (len(value),) if isinstance(value, bytes) else value.shape
        proto = (
            _field(1, 7 if isinstance(value, bytes) else _DTYPE_CODES[value.dtype])
            + _field(2, b"".join(_field(2, _field(1, dim), 2) for dim in shape), 2)
            + _field(3, shard) + _field(4, len(data[shard])) + _field(5, len(raw)) + _field(6, _masked(raw), 5)
        )  # fmt: skip
        data[shard] += raw
        entries.append((name.encode(), proto))
    index, index_entries = bytearray(), []

    def append_block(block: bytes) -> bytes:
        handle = _varint(len(index)) + _varint(len(block))
        index.extend(block + b"\0" + struct.pack("<I", _masked(block + b"\0")))
        return handle

    for start in range(0, len(entries), per_block):
        chunk = entries[start : start + per_block]
        index_entries.append((max(key for key, _ in chunk), append_block(_table_block(chunk))))
    footer = append_block(_table_block([])) + append_block(_table_block(index_entries))
    index += footer.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(index), [bytes(shard) for shard in data]


def test_reads_a_bundle_of_many_blocks_and_shards() -> None:
    rng = np.random.default_rng(0)
    tensors = {f"layer_{i:02d}/kernel": rng.standard_normal((i + 1, 3)).astype("<f4") for i in range(10)}
    tensors["global_step"] = np.array(1234, dtype="<i8")
    tensors["scale/f64"] = np.array([0.1, -2.5], dtype="<f8")
    tensors["scale/f16"] = np.array([[0.5, 65504.0]], dtype="<f2")
    tensors["zz_empty"] = np.zeros((0, 4), dtype="<f4")
    index, shards = write_bundle(dict(sorted(tensors.items())))
    num_shards, entries = read_index(index)
    assert num_shards == 2 and list(entries) == sorted(tensors)
    result = read_checkpoint(index, shards)
    for name, expected in tensors.items():
        assert result[name].shape == expected.shape, name
        np.testing.assert_array_equal(result[name], expected.astype(result[name].dtype))
    assert result["scale/f64"].dtype == result["scale/f16"].dtype == np.float32
    assert result["global_step"].dtype == np.int64 and result["global_step"] == 1234


def test_undecodable_tensors_are_listed_but_only_read_on_request() -> None:
    tensors = {"_CHECKPOINTABLE_OBJECT_GRAPH": b"\x0a\x03abc", "w": np.ones(3, dtype="<f4")}
    index, shards = write_bundle(tensors, shards=1)
    _, entries = read_index(index)
    assert entries["_CHECKPOINTABLE_OBJECT_GRAPH"].dtype is None
    assert list(read_checkpoint(index, shards, include=lambda name: name == "w")) == ["w"]
    with pytest.raises(WeightsError, match="dtype code 7 cannot be read"):
        read_checkpoint(index, shards)


@pytest.mark.parametrize(("per_block", "where"), [(8, "data block"), (2, "index block")])
def test_keys_out_of_order_raise(per_block: int, where: str) -> None:
    # The header's key "" comes first, then "b" and "a": in one data block, or in two whose separators disagree.
    tensors = {"b": np.ones(1, dtype="<f4"), "a": np.ones(1, dtype="<f4")}
    index, shards = write_bundle(tensors, shards=1, per_block=per_block)
    with pytest.raises(WeightsError, match=f"{where}.*keys out of order"):
        read_checkpoint(index, shards)
