"""Probe training, metrics, search and saved probes, on small generated datasets."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import mir_eval
import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from catalog_embed.schemas.errors import ConfigError, ProbeError
from catalog_embed.workers.probes.data import ProbeDataset, Split
from catalog_embed.workers.probes.metrics import evaluate, primary_score
from catalog_embed.workers.probes.models import MaskDropout, Probe, ProbeSpec, predict_scores
from catalog_embed.workers.probes.search import GRID, PRESETS, grid_configs, run_trial, search
from catalog_embed.workers.probes.tasks import KEY_CLASSES, TaskKind
from catalog_embed.workers.probes.train import ProbeConfig, lr_factor, restore


def train_probe(data: ProbeDataset, config: ProbeConfig):
    # One thread, as the searches run trials: tiny probes crawl when two threads fight over busy cores.
    return run_trial(data, config, threads=1)


def _dataset(kind: TaskKind, n: int = 400, dim: int = 16, seed: int = 0) -> ProbeDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32) * 3 + 1
    w = rng.normal(size=(dim, 4))
    logits = x @ w
    if kind is TaskKind.MULTILABEL:
        y, names = (logits > 0).astype(np.float32), ("a", "b", "c", "d")
    elif kind is TaskKind.REGRESSION:
        y, names = (logits[:, :2] * 10 + 5).astype(np.float32), ("v1", "v2")
    else:
        y, names = logits.argmax(1).astype(np.int64), ("w", "x", "y", "z")
    cut = [int(n * 0.7), int(n * 0.85)]
    parts = np.split(np.arange(n), cut)
    splits = {
        s: Split(np.array([f"t{i}" for i in p], dtype=object), x[p], y[p])
        for s, p in zip(("train", "valid", "test"), parts, strict=True)
    }
    return ProbeDataset(kind, names, "m", "l", splits)


def test_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(factors[:10]))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
    assert factors[55] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("kind", list(TaskKind))
def test_each_kind_learns(kind):
    data = _dataset(TaskKind.MULTICLASS if kind is TaskKind.KEY else kind)
    if kind is TaskKind.KEY:
        data = replace(data, kind=TaskKind.KEY, label_names=KEY_CLASSES)
    result = train_probe(data, ProbeConfig(hidden=(16,), dropout=0.1, max_epochs=40, lr=3e-3))
    test = data.splits["test"]
    score = primary_score(kind, test.y, predict_scores(restore(data, result), kind, test.x))
    floor = {TaskKind.MULTILABEL: 0.9, TaskKind.MULTICLASS: 0.7, TaskKind.REGRESSION: 0.8, TaskKind.KEY: 0.6}
    assert score > floor[kind]


def test_early_stopping_keeps_the_best_epoch():
    data = _dataset(TaskKind.MULTICLASS, n=200)
    result = train_probe(data, ProbeConfig(max_epochs=200, patience=3, lr=1e-2, dropout=0.0))
    assert result.epochs_run < 200
    assert result.epochs_run - result.best_epoch == 3
    assert result.best_valid == max(h["valid"] for h in result.history)
    valid = data.splits["valid"]
    kept = primary_score(data.kind, valid.y, predict_scores(restore(data, result), data.kind, valid.x))
    assert kept == pytest.approx(result.best_valid)


def test_training_is_reproducible():
    data = _dataset(TaskKind.MULTILABEL)
    config = ProbeConfig(hidden=(8,), max_epochs=5)
    a, b = train_probe(data, config), train_probe(data, config)
    c = train_probe(data, replace(config, seed=1))
    assert a.history == [dict(h, seconds=h2["seconds"]) for h, h2 in zip(b.history, a.history, strict=True)]
    for name in a.state:
        np.testing.assert_array_equal(a.state[name], b.state[name])
    assert any(not np.array_equal(a.state[n], c.state[n]) for n in a.state)


def test_divergence_is_reported_not_raised():
    data = _dataset(TaskKind.REGRESSION)
    result = train_probe(data, ProbeConfig(lr=1e30, standardize=False, dropout=0.0, max_epochs=3))
    assert result.diverged and result.best_epoch == 0 and not math.isfinite(result.best_valid)
    with pytest.raises(ProbeError, match="lower --lr"):
        search(data, [ProbeConfig(lr=1e38, standardize=False, dropout=0.0, max_epochs=2, l2=0.0)])


def test_metrics_match_the_libraries():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 24, 60)
    scores = rng.random((60, 24))
    expected = np.mean(
        [mir_eval.key.weighted_score(KEY_CLASSES[t], KEY_CLASSES[p]) for t, p in zip(y, scores.argmax(1), strict=True)]
    )
    key = evaluate(TaskKind.KEY, y, scores, KEY_CLASSES)
    assert key.metrics["key_weighted_score"] == pytest.approx(expected)
    assert sum(key.metrics[f"key_{r}"] for r in ("correct", "fifth", "relative", "parallel", "other")) == pytest.approx(
        1
    )
    multi = evaluate(TaskKind.MULTILABEL, np.array([[1, 0], [0, 0], [1, 0]]), np.random.rand(3, 2), ("p", "q"))
    assert multi.excluded == ("q",) and set(multi.per_label) == {"p"}
    reg_y, reg_s = rng.normal(size=(30, 2)), rng.normal(size=(30, 2))
    reg = evaluate(TaskKind.REGRESSION, reg_y, reg_s, ("a", "b"))
    assert reg.metrics["r2"] == pytest.approx(r2_score(reg_y, reg_s))
    assert reg.per_label["b"]["r2"] == pytest.approx(r2_score(reg_y[:, 1], reg_s[:, 1]))


def test_grid_is_castellons():
    configs = grid_configs(PRESETS["linear"])
    assert len(configs) == 216 == len(set(configs))
    assert {c.lr for c in configs} == set(GRID["lr"]) and {c.hidden for c in configs} == {(), (512,)}
    sample = grid_configs(PRESETS["linear"], max_trials=5, seed=7)
    assert sample == grid_configs(PRESETS["linear"], max_trials=5, seed=7) and len(sample) == 5
    with pytest.raises(ConfigError, match="dropout must be in"):
        ProbeConfig(dropout=1.5)


def test_saved_probe_round_trips(tmp_path):
    data = _dataset(TaskKind.MULTILABEL)
    result = train_probe(data, ProbeConfig(max_epochs=3))
    spec = ProbeSpec("tags", data.kind, "m", "l", data.in_dim, data.label_names, (), 0.5, True, result.config.to_dict())
    probe = Probe.create(spec, restore(data, result))
    probe.save(tmp_path / "out" / "probe")
    loaded = Probe.load(tmp_path / "out")
    assert loaded.probe_id == probe.probe_id and loaded.probe_id.startswith("tags-")
    x = data.splits["test"].x
    np.testing.assert_array_equal(loaded.scores(x), probe.scores(x))
    with pytest.raises(ProbeError, match="reads 16-dim embeddings"):
        loaded.scores(x[:, :8])
    (tmp_path / "out" / "probe" / "probe.safetensors").write_bytes(
        (tmp_path / "out" / "probe" / "probe.safetensors").read_bytes()[:-4] + b"\0\0\0\0"
    )
    with pytest.raises(ProbeError, match="does not match its id"):
        Probe.load(tmp_path / "out")
    with pytest.raises(ProbeError, match="no probe in"):
        Probe.load(tmp_path / "nowhere")


def test_mask_dropout_keeps_the_expectation():
    dropout = MaskDropout(0.25)
    dropout.seed(1)
    x = torch.ones(200, 500)
    y = dropout(x)
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.01
    assert abs(float(y.mean()) - 1.0) < 0.02
    dropout.seed(1)
    assert torch.equal(dropout(x), y)
    dropout.eval()
    assert torch.equal(dropout(x), x)
