"""Probe configurations: named presets, Castellon et al.'s grid, and running trials in parallel processes.

Presets:
    linear, mlp: Castellon et al.'s defaults (JukeMIR): standardised input, batch 64, learning rate 1e-3,
        dropout 0.5 on the input and hidden layer; no hidden layer, or one of 512 units.
    mule-mtt, mule-key, mule-emo: the probe configurations released with McCallum et al.'s MULE model
        (Musicset_ULarge) for MagnaTagATune, GiantSteps key and Emomusic: hidden width, dropout, L2, peak learning
        rate, 1000 warm-up steps then cosine decay over the rest of 30000 (MTT) or 10000 steps, whatever the
        number of epochs. Those releases do not give the batch size, so these presets use 64.

The grid (216 trials) is Castellon et al.'s: standardisation on/off, linear or one 512-unit layer, batch 64/256,
learning rate 1e-5/1e-4/1e-3, dropout 0.25/0.5/0.75, L2 0/1e-4/1e-3. The best trial on the validation metric wins.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace

import numpy as np
import torch

from catalog_embed.schemas.errors import ConfigError, ProbeError
from catalog_embed.workers.probes.data import ProbeDataset
from catalog_embed.workers.probes.train import ProbeConfig, TrialResult, train_probe

PRESETS: dict[str, ProbeConfig] = {
    "linear": ProbeConfig(),
    "mlp": ProbeConfig(hidden=(512,)),
    "mule-mtt": ProbeConfig(
        hidden=(512,),
        dropout=0.5,
        dropout_input=False,
        l2=1e-6,
        lr=5e-5,
        max_epochs=10**6,
        max_steps=30000,
        warmup=1000 / 30000,
    ),
    "mule-key": ProbeConfig(
        hidden=(512,), dropout=0.9, dropout_input=False, l2=1e-4, lr=1e-4, max_epochs=10**6, max_steps=10000, warmup=0.1
    ),
    "mule-emo": ProbeConfig(
        hidden=(1024,), dropout=0.5, dropout_input=False, l2=0.0, lr=1e-4, max_epochs=10**6, max_steps=10000, warmup=0.1
    ),
}

GRID: dict[str, tuple] = {
    "standardize": (True, False),
    "hidden": ((), (512,)),
    "batch_size": (64, 256),
    "lr": (1e-5, 1e-4, 1e-3),
    "dropout": (0.25, 0.5, 0.75),
    "l2": (0.0, 1e-4, 1e-3),
}

# Maps `run_trial` over configs with (parallel, threads), yielding results as they finish (processes or Ray tasks).
TrialMap = Callable[[ProbeDataset, Sequence[ProbeConfig], int, int], Iterator[TrialResult]]


def preset(name: str) -> ProbeConfig:
    """The preset called `name`; raises ConfigError listing the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        msg = f"unknown probe preset {name!r}; choose one of: {', '.join(PRESETS)}"
        raise ConfigError(msg) from None


def grid_configs(base: ProbeConfig, max_trials: int | None = None, seed: int = 0) -> list[ProbeConfig]:
    """Every grid point on top of `base` (schedule, patience and seed come from it).

    Args:
        base: supplies the fields the grid does not vary.
        max_trials: keep a seeded random sample of this many grid points (all when None).
        seed: seed of that sample.
    """
    points = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    configs = [replace(base, **point) for point in points]
    if max_trials is not None and max_trials < len(configs):
        keep = np.sort(np.random.default_rng(seed).choice(len(configs), size=max_trials, replace=False))
        configs = [configs[i] for i in keep]
    return configs


def run_trial(dataset: ProbeDataset, config: ProbeConfig, threads: int) -> TrialResult:
    """Train one trial on `threads` torch threads, restoring the caller's thread count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return train_probe(dataset, config)
    finally:
        torch.set_num_threads(previous)


def local_trials(
    dataset: ProbeDataset, configs: Sequence[ProbeConfig], parallel: int, threads: int
) -> Iterator[TrialResult]:
    """Run trials in `parallel` worker processes (in this process when 1), yielding each as it finishes.

    Workers memory-map the dataset from a temporary directory rather than receiving a pickled copy each.
    """
    if parallel <= 1 or len(configs) <= 1:
        for config in configs:
            yield run_trial(dataset, config, threads)
        return
    with tempfile.TemporaryDirectory(prefix="probe-data-") as directory:
        dataset.save(directory)
        # spawn, not fork: forking a process whose torch thread pools already ran can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=parallel, mp_context=context) as pool:
            futures = [pool.submit(_run_saved_trial, directory, config, threads) for config in configs]
            for future in as_completed(futures):
                yield future.result()


_LOADED: dict[str, ProbeDataset] = {}


def _run_saved_trial(directory: str, config: ProbeConfig, threads: int) -> TrialResult:
    # Each worker maps the dataset once and reuses it for every trial it runs.
    if directory not in _LOADED:
        _LOADED[directory] = ProbeDataset.load(directory)
    return run_trial(_LOADED[directory], config, threads)


def search(
    dataset: ProbeDataset,
    configs: Sequence[ProbeConfig],
    parallel: int = 1,
    threads: int = 1,
    trial_map: TrialMap = local_trials,
    on_trial: Callable[[TrialResult], None] | None = None,
) -> tuple[TrialResult, list[TrialResult]]:
    """Run every config, `parallel` at once on `threads` torch threads each, and pick the best validation score.

    Ties go to the earlier config. One thread per trial is the default because probes are small: on a busy
    2-core machine, two intra-op threads made a linear probe's steps ~50x and an MLP's ~10x slower (threads
    spin-waiting for a core), while separate trials in separate processes scale.

    Only the best trial keeps its weights; the others are returned as summaries (weights dropped).

    Returns:
        The best trial (with weights) and every trial in config order (weights dropped but the best's).

    Raises:
        ProbeError: every trial diverged or never produced a validation score.
    """
    order = {config: i for i, config in enumerate(configs)}
    results: list[TrialResult] = []
    best: TrialResult | None = None
    for result in trial_map(dataset, configs, parallel, threads):
        if on_trial is not None:
            on_trial(result)
        better = (
            best is None
            or result.best_valid > best.best_valid
            or (result.best_valid == best.best_valid and order[result.config] < order[best.config])
        )
        if better and math.isfinite(result.best_valid):
            if best is not None:
                best.state = {}
            best = result
        else:
            result.state = {}
        results.append(result)
    if best is None:
        msg = f"all {len(configs)} probe trial(s) diverged or never scored on the valid split: lower --lr"
        raise ProbeError(msg)
    results.sort(key=lambda r: order[r.config])
    return best, results
