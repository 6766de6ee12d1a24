"""Probe data: join embeddings (arrays of one model and layer) with a labels table on track_id, and split.

The job layer reads both (`catalog_embed.pipelines.probes.tables`): live embeddings as `Embeddings` arrays, labels as an Arrow
table with a `track_id` column plus label columns; how those are read depends on the task kind (see
`encode_targets`). Splits come from a `split`
column when there is one, else from a seeded split grouped by artist (no artist in two splits) or stratified by
label. Every problem with the inputs is raised before any training, with the fix in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import mir_eval
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_embed.schemas.errors import LabelsError, ProbeError
from catalog_embed.workers.probes.tasks import KEY_CLASSES, TaskKind

SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
    "testing": "test",
}
GROUP_COLUMNS = ("artist", "group")


@dataclass(frozen=True)
class Embeddings:
    """Live embeddings of one model and layer.

    Attributes:
        track_ids: (n,) track ids.
        vectors: (n, dim) float32.
        embedded_at: (n,) `datetime64[us]` (UTC) of each embedding, carried into predictions.
    """

    track_ids: np.ndarray
    vectors: np.ndarray
    embedded_at: np.ndarray


@dataclass(frozen=True)
class LabelSpec:
    """How to read labels and split them.

    Attributes:
        kind: the task kind.
        columns: label columns; empty means every column but `track_id`, the split and group columns.
        label_sep: for multilabel, split a string column on this separator (e.g. "|") into tags.
        split_column: the column holding train/valid/test; a seeded split is drawn when it is absent.
        group_column: the column grouping tracks that must share a split; None tries `artist` then `group`.
        fractions: train, valid and test fractions of a seeded split.
        seed: seed of the seeded split.
    """

    kind: TaskKind
    columns: tuple[str, ...] = ()
    label_sep: str | None = None
    split_column: str = "split"
    group_column: str | None = None
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0


@dataclass(frozen=True)
class Targets:
    """Encoded labels: `y` for the rows where `present` is true, the names of its outputs, and how many rows each
    label column left without a label (null, empty, NaN)."""

    y: np.ndarray
    names: tuple[str, ...]
    present: np.ndarray
    columns: tuple[str, ...]
    missing: dict[str, int] = field(default_factory=dict)


def _wrong_type(column: str, dtype: pa.DataType, kind: TaskKind, expected: str, fix: str) -> LabelsError:
    msg = f"label column {column!r} has type {dtype}, which a {kind} probe cannot use: it needs {expected}; {fix}"
    return LabelsError(msg)


def _label_columns(labels: pa.Table, spec: LabelSpec) -> tuple[str, ...]:
    if spec.columns:
        missing = [c for c in spec.columns if c not in labels.column_names]
        if missing:
            msg = f"label column(s) {missing} not in the labels table (columns: {', '.join(labels.column_names)})"
            raise LabelsError(msg)
        return spec.columns
    reserved = {"track_id", spec.split_column, *GROUP_COLUMNS, spec.group_column}
    columns = tuple(c for c in labels.column_names if c not in reserved)
    if not columns:
        msg = "the labels table has no label column besides track_id/split/group: add one"
        raise LabelsError(msg)
    single = spec.kind in (TaskKind.MULTICLASS, TaskKind.KEY)
    if single and len(columns) > 1:
        msg = f"a {spec.kind} probe needs one label column, the table has {list(columns)}: pass --label-column"
        raise LabelsError(msg)
    return columns


def _missing_cells(column: pa.ChunkedArray, kind: TaskKind) -> np.ndarray:
    """Where a label cell holds no label: null, NaN, text reading "nan" (pandas writes it), or empty text, except
    in a multilabel tag string, where empty text is an empty set of tags (like an empty list)."""
    missing = column.is_null()
    if pa.types.is_floating(column.type):
        missing = pc.or_(missing, pc.fill_null(pc.is_nan(column), False))
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        blank = ["nan"] if kind is TaskKind.MULTILABEL else ["", "nan"]
        text = pc.utf8_lower(pc.utf8_trim_whitespace(column))
        missing = pc.or_(missing, pc.fill_null(pc.is_in(text, value_set=pa.array(blank)), False))
    return missing.to_numpy(zero_copy_only=False)


def encode_targets(labels: pa.Table, spec: LabelSpec) -> Targets:
    """Encode the label columns into the probe's target array.

    multilabel: one list<string> column of tags, one string column split on `label_sep`, or one bool/0-1
    column per tag; multiclass: one string, integer or bool column; regression: one or more numeric columns;
    key: one string column of mir_eval keys ("C major", "A minor"). Rows with a missing label (null, empty text,
    NaN) are left out and counted per column, never taken for a class or a target.

    Raises:
        LabelsError: a column has the wrong type or invalid values (infinite targets, naming the tracks); the
            message says what to change.
    """
    columns = _label_columns(labels, spec)
    present = np.ones(labels.num_rows, dtype=bool)
    missing = {}
    for name in columns:
        cells = _missing_cells(labels[name], spec.kind)
        missing[name] = int(cells.sum())
        present &= ~cells
    kind = spec.kind
    if kind is TaskKind.REGRESSION:
        for name in columns:
            dtype = labels.schema.field(name).type
            if not (pa.types.is_integer(dtype) or pa.types.is_floating(dtype)):
                raise _wrong_type(name, dtype, kind, "numbers", "cast it to float or pick the right --label-column")
        y = np.stack([labels[n].to_numpy(zero_copy_only=False) for n in columns], axis=1)[present]
        infinite = ~np.isfinite(y).all(axis=1)
        if infinite.any():
            ids = np.asarray(labels["track_id"].to_pylist(), dtype=object)[present][infinite]
            msg = (
                f"regression targets {list(columns)} are infinite for {int(infinite.sum())} track(s) (e.g. "
                f"{list(ids[:5])}): fix or empty those cells (empty and NaN cells count as missing labels)"
            )
            raise LabelsError(msg)
        return Targets(y.astype(np.float32), columns, present, columns, missing)
    if kind is TaskKind.MULTILABEL:
        targets = _encode_multilabel(labels, spec, columns, present)
        return replace(targets, missing=missing)
    (name,) = columns
    dtype = labels.schema.field(name).type
    values = labels[name].to_numpy(zero_copy_only=False)[present]
    if kind is TaskKind.KEY:
        if not pa.types.is_string(dtype) and not pa.types.is_large_string(dtype):
            raise _wrong_type(name, dtype, kind, "strings like 'C major' or 'A minor'", "fix the column")
        return Targets(_encode_keys(name, values), KEY_CLASSES, present, columns, missing)
    if not (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_integer(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_dictionary(dtype)
    ):
        raise _wrong_type(
            name,
            dtype,
            kind,
            "class names (string, integer or bool)",
            "use --kind regression for numeric targets, or pick the right --label-column",
        )
    classes, y = np.unique(values, return_inverse=True)
    return Targets(y.astype(np.int64), tuple(str(c) for c in classes), present, columns, missing)


def _encode_keys(column: str, values: np.ndarray) -> np.ndarray:
    index = {}
    bad = []
    for value in np.unique(values):
        try:
            mir_eval.key.validate_key(value)
            tonic, mode = mir_eval.key.split_key_string(value)
        except ValueError:
            bad.append(value)
            continue
        if tonic is None or mode not in ("major", "minor"):
            bad.append(value)
            continue
        index[value] = tonic + (12 if mode == "minor" else 0)
    if bad:
        msg = (
            f"key column {column!r} has values that are not '<tonic> major|minor' keys: {bad[:5]}; the key probe "
            "has 24 classes, so drop rows with 'X' or 'other' and spell keys like 'Eb major' or 'F# minor'"
        )
        raise LabelsError(msg)
    return np.array([index[v] for v in values], dtype=np.int64)


def _encode_multilabel(labels: pa.Table, spec: LabelSpec, columns: tuple[str, ...], present: np.ndarray) -> Targets:
    kind = spec.kind
    if len(columns) == 1:
        (name,) = columns
        dtype = labels.schema.field(name).type
        column = labels[name].filter(pa.array(present))
        if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
            if not (pa.types.is_string(dtype.value_type) or pa.types.is_large_string(dtype.value_type)):
                raise _wrong_type(name, dtype, kind, "a list of tag strings", "cast the list items to string")
            tag_lists = column.to_pylist()
        elif pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
            if spec.label_sep is None:
                raise _wrong_type(
                    name,
                    dtype,
                    kind,
                    "a list<string> column or one 0/1 column per tag",
                    "pass --label-sep to split this column into tags",
                )
            tag_lists = [[t.strip() for t in v.split(spec.label_sep) if t.strip()] for v in column.to_pylist()]
        else:
            return _encode_tag_columns(labels, columns, present)
        names = tuple(sorted({tag for tags in tag_lists for tag in tags}))
        position = {tag: i for i, tag in enumerate(names)}
        y = np.zeros((len(tag_lists), len(names)), dtype=np.float32)
        for row, tags in enumerate(tag_lists):
            y[row, [position[t] for t in tags]] = 1.0
        return Targets(y, names, present, columns)
    return _encode_tag_columns(labels, columns, present)


def _encode_tag_columns(labels: pa.Table, columns: tuple[str, ...], present: np.ndarray) -> Targets:
    stacked = []
    for name in columns:
        dtype = labels.schema.field(name).type
        if not (pa.types.is_boolean(dtype) or pa.types.is_integer(dtype)):
            raise _wrong_type(
                name,
                dtype,
                TaskKind.MULTILABEL,
                "one bool or 0/1 column per tag (or a list column)",
                "convert it, or leave it out with --label-column",
            )
        values = labels[name].to_numpy(zero_copy_only=False)[present].astype(np.int64)
        if not np.isin(values, (0, 1)).all():
            msg = f"tag column {name!r} holds values other than 0/1: a multilabel probe needs 0/1 or bool per tag"
            raise LabelsError(msg)
        stacked.append(values)
    return Targets(np.stack(stacked, axis=1).astype(np.float32), columns, present, columns)


@dataclass(frozen=True)
class Split:
    """One split's rows: track ids, embeddings and targets, aligned."""

    track_ids: np.ndarray
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class ProbeDataset:
    """Everything a probe trains and is tested on.

    Attributes:
        kind: the task kind.
        label_names: the names of the probe's outputs (tags, classes, keys or regression targets).
        model: embedding model.
        layer: embedding layer.
        splits: "train", "valid" and "test".
        info: how the data was joined and split (counts and the split method), for the report.
    """

    kind: TaskKind
    label_names: tuple[str, ...]
    model: str
    layer: str
    splits: dict[str, Split]
    info: dict[str, object] = field(default_factory=dict)

    @property
    def out_dim(self) -> int:
        """Width of the probe's output layer."""
        return len(self.label_names)

    @property
    def in_dim(self) -> int:
        """Embedding dimensionality."""
        return int(self.splits["train"].x.shape[1])

    def save(self, directory: str | Path) -> None:
        """Write the arrays as .npy files so worker processes can memory-map them instead of copying."""
        directory = Path(directory)
        for name, split in self.splits.items():
            np.save(directory / f"{name}_x.npy", split.x)
            np.save(directory / f"{name}_y.npy", split.y)
            np.save(directory / f"{name}_ids.npy", split.track_ids.astype(str))
        meta = {"kind": str(self.kind), "label_names": self.label_names, "model": self.model, "layer": self.layer}
        (directory / "meta.json").write_text(json.dumps({**meta, "info": self.info}))

    @classmethod
    def load(cls, directory: str | Path) -> ProbeDataset:
        """Read a dataset written by `save`, memory-mapping the embeddings."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        splits = {
            name: Split(
                track_ids=np.load(directory / f"{name}_ids.npy"),
                x=np.load(directory / f"{name}_x.npy", mmap_mode="r"),
                y=np.load(directory / f"{name}_y.npy"),
            )
            for name in SPLITS
        }
        return cls(
            TaskKind(meta["kind"]), tuple(meta["label_names"]), meta["model"], meta["layer"], splits, meta["info"]
        )


def build_dataset(embeddings: Embeddings, labels: pa.Table, spec: LabelSpec, model: str, layer: str) -> ProbeDataset:
    """Join embeddings with labels on track_id, split, and check the result is trainable.

    Raises:
        LabelsError: duplicate or unmatched ids, wrong label types, unknown split names, or a class (a tag) of
            the valid or test split absent from training.
        ProbeError: a split is empty.
    """
    ids = pc.cast(labels["track_id"], pa.string())
    if pc.count_distinct(ids).as_py() != labels.num_rows:
        counts = pc.value_counts(ids)
        dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        msg = f"labels repeat track ids (e.g. {dupes}): keep one row per track (a list column holds several tags)"
        raise LabelsError(msg)
    targets = encode_targets(labels, spec)
    label_ids = np.asarray(ids.to_pylist(), dtype=object)[targets.present]
    row_of = {track_id: row for row, track_id in enumerate(embeddings.track_ids)}
    emb_rows = np.array([row_of.get(t, -1) for t in label_ids], dtype=np.int64)
    matched = emb_rows >= 0
    if not matched.any():
        msg = (
            f"none of the {len(label_ids)} labelled track ids matches one of the {len(embeddings.track_ids)} "
            f"embedded tracks of model {model!r} (labels e.g. {list(label_ids[:3])}, embeddings e.g. "
            f"{list(embeddings.track_ids[:3])}): the labels' track_id must use the catalog's ids; check --model "
            f"and that the embed job has run on these tracks"
        )
        raise LabelsError(msg)
    y, label_names, unseen = _drop_unseen(spec.kind, targets.y[matched], targets.names)
    _check_learnable(spec.kind, y, label_names, targets.columns)
    # Split only the tracks that can be used, so the fractions hold for them.
    label_rows = np.flatnonzero(targets.present)[matched]
    assignment = _assign_splits(labels, spec, y, label_rows)
    names, rows = assignment.names, emb_rows[matched]
    splits = {}
    for split in SPLITS:
        take = names == split
        if not take.any():
            msg = (
                f"the {split} split is empty ({len(rows)} labelled tracks, split: {assignment.describe}): "
                f"give it rows in the {spec.split_column!r} column, or drop that column for a seeded split"
            )
            raise ProbeError(msg)
        splits[split] = Split(embeddings.track_ids[rows[take]], embeddings.vectors[rows[take]], y[take])
    _check_training_covers(spec.kind, label_names, splits)
    info = {
        "labelled_rows": labels.num_rows,
        "rows_missing_label": int((~targets.present).sum()),
        "missing_by_column": targets.missing,
        "labelled_not_embedded": int((~matched).sum()),
        "embedded": len(embeddings.track_ids),
        "split": assignment.describe,
        "label_columns": list(targets.columns),
        "labels_only_on_unembedded_tracks": list(unseen),
        **{f"n_{s}": len(splits[s].track_ids) for s in SPLITS},
    }
    return ProbeDataset(spec.kind, label_names, model, layer, splits, info)


def _drop_unseen(kind: TaskKind, y: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...], tuple]:
    """Leave out tags and classes that only unembedded tracks have: the probe could never see an example.

    Key probes keep all 24 classes (their outputs are the key space, not the labels seen).
    """
    if kind is TaskKind.MULTILABEL:
        seen = y.sum(axis=0) > 0
        y = y[:, seen]
    elif kind is TaskKind.MULTICLASS:
        present, y = np.unique(y, return_inverse=True)
        seen = np.isin(np.arange(len(names)), present)
        y = y.astype(np.int64)
    else:
        return y, names, ()
    kept = tuple(n for n, s in zip(names, seen, strict=True) if s)
    return y, kept, tuple(n for n, s in zip(names, seen, strict=True) if not s)


@dataclass(frozen=True)
class _Assignment:
    names: np.ndarray
    describe: str


def _assign_splits(labels: pa.Table, spec: LabelSpec, y: np.ndarray, rows: np.ndarray) -> _Assignment:
    """Split names for the label table's `rows` (whose targets are `y`)."""
    if spec.split_column in labels.column_names:
        raw = labels[spec.split_column].take(rows).to_pylist()
        unknown = sorted({str(v) for v in raw if v is None or str(v).strip().lower() not in _SPLIT_ALIASES})
        if unknown:
            msg = (
                f"split column {spec.split_column!r} has values {unknown[:5]}: use train/valid/test (or "
                "training/validation/val/dev/testing) in every row, or drop the column for a seeded split"
            )
            raise LabelsError(msg)
        names = np.array([_SPLIT_ALIASES[str(v).strip().lower()] for v in raw], dtype=object)
        return _Assignment(names, f"column {spec.split_column!r}")
    rng = np.random.default_rng(spec.seed)
    group_column = spec.group_column or next((c for c in GROUP_COLUMNS if c in labels.column_names), None)
    if group_column is not None:
        if group_column not in labels.column_names:
            msg = f"group column {group_column!r} is not in the labels table: fix --group-column"
            raise LabelsError(msg)
        track_ids = labels["track_id"].take(rows).to_pylist()
        # A track without a group is its own group: it can go anywhere without leaking anything.
        groups = [
            f"track\0{t}" if g is None else f"group\0{g}"
            for g, t in zip(labels[group_column].take(rows).to_pylist(), track_ids, strict=True)
        ]
        names = _grouped_split(np.asarray(groups), spec.fractions, rng)
        return _Assignment(names, f"seeded {spec.seed}, grouped by {group_column!r}")
    names = _stratified_split(_strata(spec.kind, y), spec.fractions, rng)
    return _Assignment(names, f"seeded {spec.seed}, stratified")


def _strata(kind: TaskKind, y: np.ndarray) -> np.ndarray:
    if kind is TaskKind.MULTILABEL:
        # The rarest tag of each track: stratifying on it keeps rare tags in every split.
        frequency = y.sum(axis=0)
        rarest = np.where(y > 0, frequency, np.inf).argmin(axis=1)
        return np.where(y.any(axis=1), rarest, -1)
    if kind is TaskKind.REGRESSION:
        return np.digitize(y[:, 0], np.quantile(y[:, 0], [0.2, 0.4, 0.6, 0.8]))
    return y


def _stratified_split(
    strata: np.ndarray, fractions: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    names = np.empty(len(strata), dtype=object)
    _, f_valid, f_test = fractions
    for value in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == value))
        n_valid, n_test = round(len(rows) * f_valid), round(len(rows) * f_test)
        # Training gets at least one row of every stratum, so every class is learnable.
        n_test = min(n_test, len(rows) - 1)
        n_valid = min(n_valid, len(rows) - 1 - n_test)
        names[rows[:n_valid]] = "valid"
        names[rows[n_valid : n_valid + n_test]] = "test"
        names[rows[n_valid + n_test :]] = "train"
    return names


def _grouped_split(groups: np.ndarray, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(len(unique))
    bounds = np.cumsum(fractions)[:2] * len(groups)
    group_split = np.empty(len(unique), dtype=object)
    filled = 0
    for g in order:
        group_split[g] = "train" if filled < bounds[0] else "valid" if filled < bounds[1] else "test"
        filled += counts[g]
    return group_split[inverse]


def _check_learnable(kind: TaskKind, y: np.ndarray, names: tuple[str, ...], columns: tuple[str, ...]) -> None:
    """Refuse targets a probe cannot learn anything from: one class, no tag that varies, a constant target.

    Such a task "succeeds" with a perfect score (every track is the one class) and means nothing.
    """
    where = f"label column(s) {list(columns)}"
    if kind in (TaskKind.MULTICLASS, TaskKind.KEY):
        seen = np.unique(y)
        if len(seen) < 2:
            only = names[int(seen[0])] if len(seen) else "none"
            msg = (
                f"{where} hold(s) a single class ({only!r}) over the {len(y)} labelled, embedded tracks: a {kind} "
                "probe needs at least two classes; label tracks of other classes or pick another --label-column"
            )
            raise LabelsError(msg)
    elif kind is TaskKind.MULTILABEL:
        if not (y.min(axis=0, initial=1) < y.max(axis=0, initial=0)).any():
            msg = (
                f"no tag of {where} both applies to some and not to other labelled, embedded tracks: a multilabel "
                "probe needs tags that vary; check --label-column / --label-sep"
            )
            raise LabelsError(msg)
    elif len(y) and (y.min(axis=0) == y.max(axis=0)).all():
        msg = (
            f"the regression targets of {where} are constant over the {len(y)} labelled, embedded tracks: a probe "
            "has nothing to learn; pick another --label-column"
        )
        raise LabelsError(msg)


def _check_training_covers(kind: TaskKind, names: tuple[str, ...], splits: dict[str, Split]) -> None:
    if kind is TaskKind.REGRESSION:
        return
    if kind is TaskKind.MULTILABEL:
        train_has = splits["train"].y.sum(axis=0) > 0
        missing = [names[i] for i in np.flatnonzero(~train_has)]
        where = "no positive training example"
    else:
        train_has = np.zeros(len(names), dtype=bool)
        train_has[np.unique(splits["train"].y)] = True
        held_out = np.unique(np.concatenate([splits["valid"].y, splits["test"].y]))
        missing = [names[i] for i in held_out if not train_has[i]]
        where = "examples in valid/test but none in train"
    if missing:
        msg = (
            f"class(es) {missing[:10]} have {where}: the probe cannot learn them. Move some of their tracks to "
            "the train split, drop them from the labels, or drop the split column for a stratified seeded split"
        )
        raise LabelsError(msg)
