"""One probe trial: Adam with linear warm-up then cosine decay to zero, early stopping on the validation metric.

A trial is seeded (weight init, dropout masks and batch order) and deterministic for a given thread count. The
learning rate schedule spans the whole budget (`max_epochs` epochs or `max_steps` steps, whichever is fewer);
early stopping often ends the trial sooner and keeps the weights of the best validation epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from catalog_embed.schemas.errors import ConfigError
from catalog_embed.workers.probes.data import ProbeDataset
from catalog_embed.workers.probes.metrics import primary_score
from catalog_embed.workers.probes.models import ProbeNet, predict_scores
from catalog_embed.workers.probes.tasks import TaskKind


@dataclass(frozen=True)
class ProbeConfig:
    """Hyperparameters of one probe trial.

    Attributes:
        hidden: hidden layer sizes; empty for a linear probe.
        dropout: dropout probability (0 disables it).
        dropout_input: apply dropout to the input features too.
        l2: L2 penalty (Adam weight decay).
        standardize: standardise inputs with the training split's mean and standard deviation.
        lr: peak learning rate.
        batch_size: examples per step.
        max_epochs: epochs the schedule spans at most.
        max_steps: steps the schedule spans at most (None: no limit but `max_epochs`). The default, 30000
            steps as in McCallum et al.'s MagnaTagATune probe, ends the cosine decay after ~27 epochs of 70,000
            tracks: on the benchmark's MLP, a 30-epoch schedule gave test ROC-AUC 0.977 against 0.979 for 100
            epochs, in under a third of the epochs; small tables stay bounded by `max_epochs`.
        warmup: fraction of the schedule spent warming up linearly from zero.
        patience: epochs without a better validation metric before stopping.
        seed: seed of weight init, dropout and batch order.
    """

    hidden: tuple[int, ...] = ()
    dropout: float = 0.5
    dropout_input: bool = True
    l2: float = 0.0
    standardize: bool = True
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 100
    max_steps: int | None = 30000
    warmup: float = 0.05
    patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if any(h < 1 for h in self.hidden):
            problems.append(f"hidden sizes must be positive, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.l2 < 0 or self.lr <= 0:
            problems.append(f"l2 must be >= 0 and lr > 0, got l2={self.l2}, lr={self.lr}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            problems.append("batch size, max epochs and patience must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max steps must be at least 1, got {self.max_steps}")
        if not 0 <= self.warmup < 1:
            problems.append(f"warm-up is a fraction of the schedule in [0, 1), got {self.warmup}")
        if problems:
            msg = "invalid probe configuration: " + "; ".join(problems)
            raise ConfigError(msg)

    def label(self) -> str:
        """A short human-readable description, e.g. `mlp[512] std bs64 lr0.001 do0.5 l2=0`."""
        arch = f"mlp{list(self.hidden)}" if self.hidden else "linear"
        std = "std" if self.standardize else "raw"
        return f"{arch} {std} bs{self.batch_size} lr{self.lr:g} do{self.dropout:g} l2={self.l2:g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {**asdict(self), "hidden": list(self.hidden)}


@dataclass
class TrialResult:
    """The outcome of one trial.

    Attributes:
        config: its configuration.
        best_valid: best validation value of the task's primary metric (-inf if it never had one).
        best_epoch: epoch (1-based) of the kept weights; 0 if training diverged at once.
        epochs_run: epochs trained before early stopping or the end of the schedule.
        steps: optimiser steps taken.
        seconds: wall time of the trial.
        history: per epoch: epoch, train_loss, valid (metric), lr (at the epoch's end), seconds (elapsed).
        diverged: the loss became NaN or infinite, which ended the trial.
        state: the kept weights, as numpy arrays (picklable across processes).
    """

    config: ProbeConfig
    best_valid: float
    best_epoch: int
    epochs_run: int
    steps: int
    seconds: float
    history: list[dict[str, float]]
    diverged: bool = False
    state: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary without the weights."""
        return {
            "config": self.config.to_dict(),
            "label": self.config.label(),
            "best_valid": self.best_valid if math.isfinite(self.best_valid) else None,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "steps": self.steps,
            "seconds": self.seconds,
            "seconds_per_epoch": self.seconds / max(self.epochs_run, 1),
            "seconds_to_best": self.history[self.best_epoch - 1]["seconds"] if self.best_epoch else 0.0,
            "diverged": self.diverged,
        }


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then cosine decay reaching zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_net(dataset: ProbeDataset, config: ProbeConfig) -> ProbeNet:
    """A network for `dataset` with standardisation (and regression target scaling) fitted on training data."""
    net = ProbeNet(dataset.in_dim, dataset.out_dim, config.hidden, config.dropout, config.dropout_input)
    train = dataset.splits["train"]
    if config.standardize:
        mean, std = _column_stats(train.x)
        net.in_mean.copy_(torch.from_numpy(mean))
        net.in_scale.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0)))
    if dataset.kind is TaskKind.REGRESSION:
        # MSE on standardised targets weighs every target alike and keeps the initial loss near 1.
        mean, std = _column_stats(train.y)
        net.out_mean.copy_(torch.from_numpy(mean))
        net.out_scale.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0)))
    return net


def _column_stats(x: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    # Chunked float64 sums: exact enough and never a second full-size copy of a large (maybe mmapped) array.
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start : start + chunk], dtype=np.float64)
        total += block.sum(axis=0)
        squares += (block * block).sum(axis=0)
    mean = total / len(x)
    var = np.maximum(squares / len(x) - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _loss(kind: TaskKind, net: ProbeNet, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind is TaskKind.MULTILABEL:
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y)
    if kind is TaskKind.REGRESSION:
        return torch.nn.functional.mse_loss(out, (y - net.out_mean) / net.out_scale)
    return torch.nn.functional.cross_entropy(out, y)


def train_probe(dataset: ProbeDataset, config: ProbeConfig) -> TrialResult:
    """Train one probe on the train split, early-stopping on the valid split's primary metric.

    The caller sets torch's thread count (see `catalog_embed.workers.probes.search.run_trial`).
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    kind = dataset.kind
    train, valid = dataset.splits["train"], dataset.splits["valid"]
    net = build_net(dataset, config)
    net.seed_dropout(config.seed)
    # fused: one kernel for the whole update; measured ~2x faster steps than the default on the CPU.
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.l2, fused=True)
    steps_per_epoch = math.ceil(len(train.x) / config.batch_size)
    total_steps = min(config.max_epochs * steps_per_epoch, config.max_steps or math.inf)
    warmup_steps = round(config.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
    y_train = torch.from_numpy(train.y)

    history: list[dict[str, float]] = []
    best_valid, best_epoch, best_state = -math.inf, 0, _snapshot(net)
    step, stale, diverged = 0, 0, False
    for epoch in range(1, math.ceil(total_steps / steps_per_epoch) + 1):
        net.train()
        order = rng.permutation(len(train.x))
        loss_sum, loss_count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            if step >= total_steps:
                break
            # Sorted indices read a memory-mapped array front to back; the batch's order does not matter.
            rows = np.sort(order[start : start + config.batch_size])
            x = torch.from_numpy(np.ascontiguousarray(train.x[rows], dtype=np.float32))
            loss = _loss(kind, net, net(x), y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += float(loss.detach()) * len(rows)
            loss_count += len(rows)
        train_loss = loss_sum / max(loss_count, 1)
        if not math.isfinite(train_loss):
            diverged = True
            break
        score = primary_score(kind, valid.y, predict_scores(net, kind, valid.x))
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "valid": score,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
        )
        if score > best_valid:
            best_valid, best_epoch, best_state, stale = score, epoch, _snapshot(net), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
        if step >= total_steps:
            break
    return TrialResult(
        config=config,
        best_valid=best_valid,
        best_epoch=best_epoch,
        epochs_run=len(history),
        steps=step,
        seconds=time.perf_counter() - started,
        history=history,
        diverged=diverged,
        state=best_state,
    )


def _snapshot(net: ProbeNet) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in net.state_dict().items()}


def restore(dataset: ProbeDataset, result: TrialResult) -> ProbeNet:
    """The network of a finished trial, with its kept weights, in eval mode."""
    net = ProbeNet(
        dataset.in_dim, dataset.out_dim, result.config.hidden, result.config.dropout, result.config.dropout_input
    )
    # A copy: trial results from Ray arrive as read-only arrays.
    net.load_state_dict({name: torch.tensor(array) for name, array in result.state.items()})
    net.eval()
    return net
