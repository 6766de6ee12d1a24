"""The two compute stages of the embed job, shared by every runner through the shard core (`catalog_embed.workers.shard`).

`DecodeStage` (CPU: read, decode, resample, front end) turns a work item into windows or a failure.
`EmbedStage` (the encoder's device) embeds windows batched across tracks and pools them per track.
Both follow the stage contract (`Stage`): a frozen config, expensive state built once in `setup()`, released in
`teardown()`, the resources a worker needs declared in `resources`, no engine imports.

Where the front end runs is the config's choice (`EncoderConfig.front_end_on`): next to the decoder, which ships
windows to the encoder, or on the encoder's device (the default with a GPU). Then the decoder stops at the file's own
rate and ships the mono waveform in float16 (`SHIPPED_DTYPE`), and the encoder's device resamples it and computes the
spectrogram, batch after batch: on a GPU node's few cores, resampling cost about as much as decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from catalog_embed.schemas.errors import ConfigError, EncoderError, FrontEndError, TrackError
from catalog_embed.schemas.records import TrackEmbedding, TrackFailure, WorkItem
from catalog_embed.workers import failpoints
from catalog_embed.workers.audio import (
    SOXR_HQ,
    Audio,
    DecodeConfig,
    DeviceResampler,
    load_audio,
    resample,
    resampled_length,
    resamples_on_device,
)
from catalog_embed.workers.encoders import Encoder, FrontEnd, get_encoder
from catalog_embed.workers.encoders.base import MemoryFootprint, parse_device, resolve_precision

FRONT_END_PLACEMENTS = ("auto", "decoder", "encoder")
# Windows per encoder call on a CPU: small calls run as fast or faster, and hold less. bench/encoders_bench.py
# --batches 8,64 (2 threads, windows/s at 8 and 64): mfcc-stats 987 and 472, chroma-stats 804 and 520 (their
# spectrograms, 1,025 bins x 130 frames of complex64 a window, outgrow the caches), musicnn-mtt 50.7 and 50.2,
# mule-sfnfnet-f0 18.3 and 14.2.
CPU_BATCH_WINDOWS = 8
# Used when the GPU is not visible from where the run is configured (Dataflow workers, a Ray cluster).
REMOTE_CUDA_BATCH_WINDOWS = 256
# A GPU's batch: its measured footprint within this share of the free memory, at most this many windows.
CUDA_MEMORY_SHARE = 0.5
MAX_CUDA_BATCH_WINDOWS = 1024
# How a decoder ships a waveform to the encoder's device: half the bytes of float32, and its rounding (11
# significant bits, relative to each sample, as suits log-mel features) moved musicnn's embeddings of 40 demo tracks
# by at most 4e-7 in cosine distance per window (tests/workers/test_precision.py holds it to 1e-5).
SHIPPED_DTYPE = torch.float16
# How a front end wants a file decoded: (rate, None for the file's own; channel rule; resampler), as `load_audio` takes.
AudioRequest = tuple[int | None, str, str]


@dataclass(frozen=True)
class Resources:
    """What one instance of a stage needs from the worker that runs it; engines reserve it (Ray) or place it.

    Attributes:
        cpus: CPU cores.
        gpus: accelerators (0 or 1 here: one encoder per GPU).
        memory_mb: memory beyond the worker's own; 0 when not bounded.
    """

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: float = 0.0


class Stage(Protocol):
    """The unit of work every engine schedules: built from a frozen config, cheap to construct and to pickle,
    its expensive state made once per worker in `setup()`."""

    @property
    def resources(self) -> Resources:
        """What one instance needs."""

    def setup(self) -> None:
        """Build the expensive state (a model, a front end) once per worker; calling it again does nothing."""

    def process(self, batch: Any) -> Any:
        """Process one unit of input; per-track errors come back as `TrackFailure`s, never as exceptions."""

    def teardown(self) -> None:
        """Release what `setup()` built."""


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder, which outputs, where and how it runs.

    The precision is deliberately not part of an embedding's key (model version and feature hash): like the
    device or the batch size it changes how a network is computed, not which network (bf16 stays within cosine
    0.999 of fp32, see tests/workers/test_precision.py), so switching it does not re-embed the catalog. Each row's
    run_id leads to its `runs` row, whose config records the precision it was computed in.

    Attributes:
        model: registry name (see `catalog-embed models`), or the path or URI of a bring-your-own encoder's JSON
            config (any name ending in `.json`, see `catalog_embed.workers.encoders.custom`).
        layers: layers to write; the first fills the `embedding` column, others `embedding_<layer>`. Empty means
            the encoder's default layer.
        device: 'cpu', 'cuda' or 'cuda:N'; asking for CUDA without a GPU is an error.
        batch_windows: windows per encoder call, assembled across tracks; None sizes it to the device (see
            `windows_per_batch`).
        weights: weights file or folder for encoders that do not fetch their own (a BYO encoder: its model or
            weights file, instead of the one its config names).
        weights_sha256: pin the weights; a mismatch is an error.
        precision: "fp32", "bf16" or "fp16" (GPU only): the network's compute precision under torch.autocast.
        front_end_on: "decoder" (the decode workers' CPUs), "encoder" (the encoder's device) or "auto" (the
            encoder's when it is a GPU).
        compile: run the network through `torch.compile` in batches of one fixed shape (see `Encoder.compile`);
            None: where it applies, on a GPU (see `compiles`).
        trust_remote_code: `hf:` models only: let `transformers` run Python code the checkpoint ships (its own
            model classes). Off unless asked for; recorded with the run's config.
        window_s: `hf:` models whose network takes any length (wav2vec2-style) and `hear:` modules: seconds per
            window (None: 10 s).
    """

    model: str = "musicnn-msd"
    layers: tuple[str, ...] = ()
    device: str = "cpu"
    batch_windows: int | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    precision: str = "fp32"
    front_end_on: str = "auto"
    compile: bool | None = None
    trust_remote_code: bool = False
    window_s: float | None = None

    def build(self) -> Encoder:
        """Construct the encoder (no weights loaded), after checking the options that need no encoder.

        Raises:
            ConfigError: unknown front end placement.
            EncoderError: unknown model, malformed device, unknown precision, fp16 on a CPU, or --compile for an
                encoder that cannot be compiled.
        """
        if self.front_end_on not in FRONT_END_PLACEMENTS:
            msg = f"--front-end-on {self.front_end_on!r} is unknown; choose one of: {', '.join(FRONT_END_PLACEMENTS)}"
            raise ConfigError(msg)
        resolve_precision(self.precision, self.device)
        options = {
            k: v
            for k, v in (
                ("weights", self.weights),
                ("weights_sha256", self.weights_sha256),
                ("trust_remote_code", self.trust_remote_code),
                ("window_s", self.window_s),
            )
            if v
        }
        encoder = get_encoder(self.model, **options)
        if self.compile and not encoder.compilable:
            msg = f"--compile: encoder {encoder.name!r} has no PyTorch network to compile; run it without --compile"
            raise EncoderError(msg)
        return encoder

    @property
    def front_end_on_encoder(self) -> bool:
        """Whether the front end runs on the encoder's device rather than next to the decoder."""
        if self.front_end_on == "auto":
            return parse_device(self.device).type == "cuda"
        return self.front_end_on == "encoder"

    def windows_per_batch(self, device_is_here: bool = True, encoder: Encoder | None = None) -> int:
        """`batch_windows`, or a size for the device when it is None.

        The CPU gets `CPU_BATCH_WINDOWS`. A GPU visible here (`device_is_here`) gets `cuda_batch_windows` of its
        free memory and the encoder's footprint measured in this precision (`encoder` when it is loaded here,
        else one loaded for the probe); a GPU elsewhere gets `REMOTE_CUDA_BATCH_WINDOWS`.
        """
        if self.batch_windows is not None:
            return self.batch_windows
        device = parse_device(self.device)
        if device.type == "cpu":
            return CPU_BATCH_WINDOWS
        if not device_is_here:
            return REMOTE_CUDA_BATCH_WINDOWS
        if encoder is None:
            encoder = self.build()
            encoder.load(device, self.precision)
        footprint = encoder.measure_memory()
        torch.cuda.empty_cache()
        free_bytes, _total = torch.cuda.mem_get_info(device)
        return cuda_batch_windows(free_bytes, footprint)

    def sized(self, device_is_here: bool = True) -> EncoderConfig:
        """This config with `batch_windows` fixed by `windows_per_batch` (what runners batch by and runs record)."""
        return dataclasses.replace(self, batch_windows=self.windows_per_batch(device_is_here))

    def compiles(self, encoder: Encoder) -> bool:
        """Whether `encoder` runs compiled: as `compile` says, or when it is None, if it can be and on a GPU.

        Measured: on an H200 compiling made SF-NFNet-F0 3.3x faster (45 s to compile) and musicnn 1.1x (17 s);
        on 2 CPU cores musicnn ran no faster (batch 64, calls taking turns: 3.97 windows/s against 4.07 eager)
        and compiling took 47-137 s cold, 14-27 s from the cache.
        """
        if self.compile is None:
            return encoder.compilable and parse_device(self.device).type == "cuda"
        return self.compile

    @property
    def gpus(self) -> int:
        """Accelerators an encoder with this config takes: one on CUDA, none on the CPU."""
        return 1 if parse_device(self.device).type == "cuda" else 0

    def resolved_layers(self, encoder: Encoder) -> tuple[str, ...]:
        """The layers to write, validated against the encoder (raises EncoderError naming valid ones)."""
        layers = self.layers or (encoder.default_layer,)
        for name in layers:
            encoder.layer(name)
        return layers


def cuda_batch_windows(free_bytes: int, footprint: MemoryFootprint) -> int:
    """Windows per batch on a GPU with `free_bytes` free, for an encoder measured to take `footprint` per call.

    The batch's footprint stays within `CUDA_MEMORY_SHARE` of the free memory (as a power of two, at least 1):
    the rest is headroom for the front end on the device and fragmentation. The cap keeps a large GPU from one
    huge batch per shard.
    """
    return footprint.batch_windows(free_bytes, CUDA_MEMORY_SHARE, MAX_CUDA_BATCH_WINDOWS)


@dataclass
class TrackFeatures:
    """A decoded track's encoder input: its windows, or its waveform when the encoder's device makes them.

    Attributes:
        windows: (n_windows, *window_shape) from the front end; None when `waveform` is set instead.
        starts: start time (s) of each window; also gives the number of windows before they exist.
        duration_s: the audio's duration, counted at the front end's sample rate wherever it is resampled.
        waveform: (samples,) at `sample_rate` in `SHIPPED_DTYPE`, for a front end on the encoder's device.
        sample_rate: the waveform's rate (the file's own), which the encoder's device resamples from.
    """

    item: WorkItem
    windows: torch.Tensor | None
    starts: list[float]
    duration_s: float
    waveform: torch.Tensor | None = None
    sample_rate: int | None = None

    @property
    def n_windows(self) -> int:
        """Windows this track contributes to a batch."""
        return len(self.starts)

    def pinned(self) -> TrackFeatures:
        """This track with its tensor in page-locked memory (CUDA only), from which the copy to the GPU runs
        asynchronously; from pageable memory a `non_blocking` copy waits for the transfer."""
        if self.windows is not None:
            return dataclasses.replace(self, windows=self.windows.pin_memory())
        return dataclasses.replace(self, waveform=self.waveform.pin_memory())

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor carried to the encoder."""
        return (self.windows if self.windows is not None else self.waveform).nbytes

    def __getstate__(self) -> dict[str, Any]:
        # A track crosses processes (decode children, Ray, Beam) with its tensor as a numpy array. torch's
        # multiprocessing pickler would share each tensor through a file descriptor and a socket round trip of
        # multiprocessing's resource sharer (0.5 ms a one-second clip, measured: a quarter of decoding it), plain
        # pickle through torch.save (7x numpy's cost); Ray ships numpy arrays without a copy.
        state = dict(self.__dict__)
        for name in _TENSORS:
            if state[name] is not None:
                state[name] = state[name].numpy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in _TENSORS:
            array = state[name]
            if array is not None:
                # Ray hands out read-only views of its object store; torch tensors must own writable memory.
                state[name] = torch.from_numpy(array if array.flags.writeable else array.copy())
        self.__dict__.update(state)


_TENSORS = ("windows", "waveform")


@dataclass
class DecodeStage:
    """Read, decode and window one track on the CPU; when the front end runs on the encoder, only decode, at the
    file's own rate."""

    encoder: EncoderConfig
    decode: DecodeConfig = DecodeConfig()
    _front_end: FrontEnd | None = field(default=None, init=False, repr=False)

    @property
    def resources(self) -> Resources:
        """One core and the decode memory cap (`--decode-memory-mb`)."""
        return Resources(cpus=1.0, memory_mb=self.decode.max_memory_mb)

    def setup(self) -> None:
        """Build the front end once per worker."""
        if self._front_end is None:
            self._front_end = self.encoder.build().front_end().eval()

    def teardown(self) -> None:
        """Drop the front end."""
        self._front_end = None

    def process(self, item: WorkItem) -> TrackFeatures | TrackFailure:
        """Decode `item`; every per-track error becomes a TrackFailure, never an exception."""
        self.setup()
        failpoints.hit("decode", item.uri)
        try:
            audio = _load(item.uri, self.audio_request(), self.decode)
        except TrackError as exc:
            return TrackFailure.from_error(item, exc)
        return self.features(item, audio.samples, audio.sample_rate)

    def audio_request(self) -> AudioRequest:
        """How this stage's front end wants the file decoded: (rate or None for the file's own, channel rule,
        resampler); see `load_audio`."""
        self.setup()
        front_end = self._front_end
        # The device's resampler is soxr HQ's: another resampler runs here, in the decoder.
        stop_at_own_rate = self.encoder.front_end_on_encoder and front_end.resampler == SOXR_HQ
        return None if stop_at_own_rate else front_end.sample_rate, front_end.channels, front_end.resampler

    def features(self, item: WorkItem, samples: np.ndarray, rate: int) -> TrackFeatures | TrackFailure:
        """A decoded track's encoder input from its samples at `rate`, decoded as `audio_request` says (at the
        file's own rate too when the resampler is soxr HQ: then it is resampled here, as `load_audio` would)."""
        self.setup()
        front_end = self._front_end
        on_encoder = self.encoder.front_end_on_encoder
        if rate != front_end.sample_rate and not (on_encoder and resamples_on_device(rate, front_end.sample_rate)):
            samples, rate = resample(samples, rate, front_end.sample_rate), front_end.sample_rate
        n_samples = resampled_length(samples.shape[-1], rate, front_end.sample_rate)
        # Channels kept apart are windowed one after the other, each on the same timeline.
        starts = front_end.window_starts(n_samples) * (len(samples) if samples.ndim == 2 else 1)
        duration_s = n_samples / front_end.sample_rate
        if on_encoder:
            waveform = torch.from_numpy(samples).to(SHIPPED_DTYPE)
            return TrackFeatures(item, None, starts, duration_s, waveform=waveform, sample_rate=rate)
        try:
            with torch.inference_mode():
                windows = front_end(torch.from_numpy(samples))
        except (RuntimeError, ValueError) as exc:
            return TrackFailure.from_error(item, FrontEndError(f"front end failed: {exc}"))
        return TrackFeatures(item=item, windows=windows, starts=starts, duration_s=duration_s)

    __call__ = process  # a plain callable for process pools (`catalog_embed.workers.isolation`)


def _load(uri: str, request: AudioRequest, decode: DecodeConfig) -> Audio:
    """`load_audio` as a front end's `AudioRequest` says."""
    rate, channels, resampler = request
    return load_audio(uri, rate, decode, channels, resampler)


@dataclass
class TrackFeatureSet:
    """One decoded track's encoder inputs for several encoders (`MultiDecodeStage`), in the order of its stages.

    Attributes:
        per_model: one entry per encoder: its `TrackFeatures`, its `TrackFailure` (the decode or its front end
            failed), or None when the plan does not embed this track with that encoder.
    """

    item: WorkItem
    per_model: tuple[TrackFeatures | TrackFailure | None, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors carried to the encoders."""
        return sum(f.nbytes for f in self.per_model if isinstance(f, TrackFeatures))


@dataclass
class MultiDecodeStage:
    """Decode one track once for several encoders (`--model a,b,...`), each getting its own front end's input.

    Encoders that want the same decode (channel rule and, for FFmpeg's in-loop resampler, rate) share one: soxr HQ
    runs after the decode loop, so such a decode stops at the file's rate and each encoder's input is resampled
    from it, exactly as a decode for that encoder alone would (`DecodeStage.features`).

    Args:
        stages: one decode stage per encoder.
        skip: per encoder, the work items' track ids it does not embed (current for it, new for another).
    """

    stages: tuple[DecodeStage, ...]
    skip: tuple[frozenset[str], ...]

    @property
    def resources(self) -> Resources:
        """One core and the decode memory cap, as each stage."""
        return self.stages[0].resources

    def setup(self) -> None:
        """Build every encoder's front end once per worker."""
        for stage in self.stages:
            stage.setup()

    def teardown(self) -> None:
        """Drop the front ends."""
        for stage in self.stages:
            stage.teardown()

    def process(self, item: WorkItem) -> TrackFeatureSet | TrackFailure:
        """Decode `item` once per distinct decode its encoders want; a failure of the decode itself (the same for
        every encoder) comes back as one TrackFailure, never an exception."""
        failpoints.hit("decode", item.uri)
        wanted = [i for i, skip in enumerate(self.skip) if item.track_id not in skip]
        decoded: dict[AudioRequest, tuple[np.ndarray, int]] = {}
        per_model: list[TrackFeatures | TrackFailure | None] = [None] * len(self.stages)
        for i in wanted:
            stage = self.stages[i]
            rate, channels, resampler = stage.audio_request()
            request = (None if resampler == SOXR_HQ else rate, channels, resampler)
            if request not in decoded:
                try:
                    audio = _load(item.uri, request, stage.decode)
                except TrackError as exc:
                    return TrackFailure.from_error(item, exc)
                decoded[request] = audio.samples, audio.sample_rate
            per_model[i] = stage.features(item, *decoded[request])
        return TrackFeatureSet(item, tuple(per_model))

    __call__ = process


@dataclass
class EmbedStage:
    """Embed windows batched across tracks and mean-pool them per track.

    Tracks that arrive as waveforms (`EncoderConfig.front_end_on_encoder`) are resampled and go through the front
    end on the encoder's device first, in float32; only the network runs in the configured precision. A track the
    front end fails on, or whose embeddings are not finite (NaN, inf), comes back as a `TrackFailure`; an error of the
    encoder itself raises, for the shard core (`catalog_embed.workers.shard`) to find the track that causes it.
    """

    encoder: EncoderConfig
    keep_timeline: bool = False
    _model: Encoder | None = field(default=None, init=False, repr=False)
    _front_end: FrontEnd | None = field(default=None, init=False, repr=False)
    _resample: DeviceResampler | None = field(default=None, init=False, repr=False)
    _layers: tuple[str, ...] = field(default=(), init=False, repr=False)
    batch_windows: int = field(default=0, init=False, repr=False)

    @property
    def resources(self) -> Resources:
        """One core, and the GPU when the encoder runs on one."""
        return Resources(cpus=1.0, gpus=float(self.encoder.gpus))

    def setup(self) -> None:
        """Load the encoder once per worker on the configured device, with its front end there if configured."""
        if self._model is None:
            model = self.encoder.build()
            self._layers = self.encoder.resolved_layers(model)
            model.load(self.encoder.device, self.encoder.precision)
            if self.encoder.front_end_on_encoder:
                self._front_end = model.front_end().to(model.device).eval()
                self._resample = DeviceResampler(self._front_end.sample_rate)
            if model.device.type == "cuda":
                # Batches of one shape (see `Encoder.fix_batch`): cuDNN times its algorithms for that shape once and
                # keeps the fastest. Process-wide, which is this worker's.
                torch.backends.cudnn.benchmark = True
            self.batch_windows = self.encoder.windows_per_batch(encoder=model)
            if self.encoder.compiles(model):
                model.compile(self.batch_windows)
            elif model.device.type == "cuda":
                model.fix_batch(self.batch_windows)
            self._model = model

    def shrink_batch(self) -> bool:
        """Halve the windows per encoder call after the device ran out of memory; False when already at one.

        An encoder of a fixed batch (a GPU's, a compiled one) pads every call to that size, so the size is fixed
        again (and compiled again): otherwise the smaller batches would take as much memory as before.
        """
        if self.batch_windows <= 1:
            return False
        self.batch_windows //= 2
        model = self._model
        if model is not None and model.fixed_batch is not None and self.batch_windows < model.fixed_batch:
            model.fix_batch(self.batch_windows)
        return True

    def teardown(self) -> None:
        """Drop the encoder (and the device memory it holds)."""
        self._model = self._front_end = self._resample = None

    @property
    def model(self) -> Encoder:
        """The loaded encoder."""
        self.setup()
        return self._model

    def _windows(self, track: TrackFeatures) -> torch.Tensor:
        """A track's windows: as decoded, or resampled and made from its waveform on the encoder's device.

        Raises:
            FrontEndError: the front end on the encoder's device failed on this track.
        """
        if track.windows is not None:
            return track.windows.to(self._model.device, non_blocking=True)
        try:
            with torch.inference_mode():
                waveform = track.waveform.to(self._model.device, non_blocking=True).float()
                return self._front_end(self._resample(waveform, track.sample_rate))
        except torch.OutOfMemoryError:
            raise  # the device's fault, not the track's: the shard core retries with smaller batches
        except (RuntimeError, ValueError) as exc:
            msg = f"front end failed: {exc}"
            raise FrontEndError(msg) from exc

    def _batches(
        self, tracks: list[TrackFeatures], counts: list[int], failed: dict[int, TrackFailure]
    ) -> Iterator[torch.Tensor]:
        """Batches of `batch_windows` windows across `tracks`, appending each track's window count to `counts`
        (0 for a track the front end failed on, which goes to `failed` by its index).

        Windows are made one track at a time, so at most a batch plus one track's windows are held at once
        (which matters on a GPU, where the front end may run: a shard of long tracks is many windows).
        """
        size = self.batch_windows
        # Joined once per batch: concatenating each track onto the pending windows copied them again per track,
        # quadratic in the tracks per batch (64 one-window clips: 2,080 window copies instead of 64).
        pending: list[torch.Tensor] = []
        n_pending = 0
        for i, track in enumerate(tracks):
            try:
                windows = self._windows(track)
            except FrontEndError as exc:
                failed[i] = TrackFailure.from_error(track.item, exc)
                counts.append(0)
                continue
            counts.append(len(windows))
            pending.append(windows)
            n_pending += len(windows)
            if n_pending >= size:
                joined = torch.cat(pending)
                while len(joined) >= size:
                    yield joined[:size]
                    joined = joined[size:]
                pending, n_pending = [joined], len(joined)
        if n_pending:
            yield torch.cat(pending)

    def process(self, tracks: list[TrackFeatures]) -> list[TrackEmbedding | TrackFailure]:
        """Embed every window of `tracks` in batches of `batch_windows`, then pool per track.

        Returns:
            One result per track, in order.

        Raises:
            Exception: whatever the encoder raised on a batch (torch.OutOfMemoryError on a full GPU, a
                bring-your-own network's own error, an injected `encode` failpoint).
        """
        if not tracks:
            return []
        model = self.model
        for track in tracks:
            failpoints.hit("encode", track.item.track_id)  # as if a batch holding this track made the encoder raise
        counts: list[int] = []
        failed: dict[int, TrackFailure] = {}
        outputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in self._layers}
        for batch in self._batches(tracks, counts, failed):
            for layer, values in model.embed(batch, self._layers).items():
                outputs[layer].append(values.cpu())
        per_layer = {
            layer: torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
            for layer, chunks in outputs.items()
        }
        results: list[TrackEmbedding | TrackFailure] = []
        offset = 0
        for i, (track, n) in enumerate(zip(tracks, counts, strict=True)):
            window_values = {layer: values[offset : offset + n] for layer, values in per_layer.items()}
            offset += n
            if i in failed:
                results.append(failed[i])
                continue
            not_finite = [layer for layer, values in window_values.items() if not np.isfinite(values).all()]
            if not_finite:
                msg = f"the encoder returned non-finite values (NaN or inf) in layer(s) {', '.join(not_finite)}"
                results.append(TrackFailure(track.item, "encode", "NonFiniteEmbedding", msg))
                continue
            results.append(
                TrackEmbedding(
                    item=track.item,
                    duration_s=track.duration_s,
                    n_windows=n,
                    pooled={layer: values.mean(axis=0) for layer, values in window_values.items()},
                    timeline=window_values[self._layers[0]] if self.keep_timeline else None,
                    starts=track.starts,
                )
            )
        return results

    __call__ = process
