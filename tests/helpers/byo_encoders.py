"""Tiny bring-your-own encoders for the shard core's fault tests, saved as users save theirs (see
`catalog_embed.workers.encoders.custom`): one that returns NaN on loud windows (TorchScript, so that Beam's and Ray's workers
load it without importing anything of the tests) and one whose network runs out of memory above a batch size (a
factory: what a full GPU does, on a CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch

from catalog_embed.schemas.records import WorkItem
from catalog_embed.workers.stages import DecodeStage, EncoderConfig, TrackFeatures

LICENCE = {"code": "MIT", "weights": "CC-BY-4.0"}
# One-second windows of the waveform at 16 kHz: four per 4 s track of the small catalog.
WAVEFORM = {"type": "waveform", "sample_rate": 16000, "window_s": 1.0}
LAYERS = {"embedding": 4}

OOM_FACTORY = '''
import torch


class SmallMemoryNet(torch.nn.Module):
    """Mean and peak of each window, projected; a batch above `max_windows` windows raises CUDA's out-of-memory
    error, as a network on a full GPU does."""

    def __init__(self, max_windows: int) -> None:
        super().__init__()
        self.max_windows = max_windows
        self.proj = torch.nn.Linear(2, 4)

    def forward(self, windows):
        if len(windows) > self.max_windows:
            raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {len(windows)} windows")
        return self.proj(torch.stack([windows.mean(dim=1), windows.abs().amax(dim=1)], dim=1))


def build(max_windows: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallMemoryNet(max_windows)
'''


class LoudNaNNet(torch.nn.Module):
    """Mean and peak of each window (any layout), projected; NaN for every window whose peak is above
    `nan_above`."""

    def __init__(self, nan_above: float) -> None:
        super().__init__()
        self.nan_above = nan_above
        self.proj = torch.nn.Linear(2, 4)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        flat = windows.flatten(1)
        peak = flat.abs().amax(dim=1, keepdim=True)
        out = self.proj(torch.cat([flat.mean(dim=1, keepdim=True), peak], dim=1))
        return torch.where(peak > self.nan_above, torch.full_like(out, float("nan")), out)


def loud_nan_encoder(folder: Path, nan_above: float, front_end: dict | None = None) -> Path:
    """Save a `LoudNaNNet` with its JSON config in `folder` (front end: `WAVEFORM` unless given); returns the
    config's path (a `--model` value)."""
    torch.manual_seed(0)
    torch.jit.script(LoudNaNNet(nan_above)).save(str(folder / "loud-nan.pt"))
    config = folder / "loud-nan.json"
    config.write_text(
        json.dumps(
            {"name": "loud-nan", "kind": "torchscript", "path": "loud-nan.pt", "front_end": front_end or WAVEFORM,
             "layers": LAYERS, "licence": LICENCE}  # fmt: skip
        )
    )
    return config


def small_memory_encoder(folder: Path, max_windows: int) -> Path:
    """Write the out-of-memory factory module into `folder` (which must be on sys.path) with a JSON config whose
    network holds at most `max_windows` windows per call; returns the config's path."""
    (folder / "small_memory_factory.py").write_text(OOM_FACTORY)
    config = folder / f"small-memory-{max_windows}.json"
    config.write_text(
        json.dumps(
            {"name": "small-memory", "kind": "factory", "factory": "small_memory_factory:build",
             "kwargs": {"max_windows": max_windows}, "front_end": WAVEFORM, "layers": LAYERS, "licence": LICENCE}
        )  # fmt: skip
    )
    return config


def loud_half(manifest: Path, folder: Path) -> tuple[float, list[str]]:
    """A peak between the quieter and the louder half of the decodable tracks of `manifest` (as the waveform
    front end windows them), and the louder half's track ids: a `LoudNaNNet` with that `nan_above` returns NaN
    for exactly those tracks."""
    stage = DecodeStage(EncoderConfig(model=str(loud_nan_encoder(folder, math.inf))))
    peaks = {}
    for row in pq.read_table(manifest).to_pylist():
        result = stage.process(WorkItem(row["track_id"], row["uri"], ""))
        if isinstance(result, TrackFeatures):
            peaks[row["track_id"]] = float(result.windows.abs().max())
    ordered = sorted(peaks.values())
    threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    return threshold, sorted(track_id for track_id, peak in peaks.items() if peak > threshold)
