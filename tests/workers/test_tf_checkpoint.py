"""Our TensorFlow checkpoint reader on the real musicnn checkpoints, and on corrupted copies of them.

The checkpoints come from the sha256-pinned musicnn wheel: fetched from PyPI on first use into the default weights
cache, offline afterwards.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from schemas.errors import WeightsError
from workers.encoders.musicnn import WHEEL_FILENAME, WHEEL_PROJECT, WHEEL_SHA256, WHEEL_VERSION
from workers.encoders.tf_checkpoint import crc32c, load_checkpoint, read_checkpoint, read_index
from workers.encoders.weights import fetch_pypi_wheel

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
