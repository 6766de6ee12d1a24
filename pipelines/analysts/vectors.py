"""What the analysts' commands (`similar`, `index`, `map`, `compare`) share: the `--out`/`--storage-option`
arguments, `MODEL@VERSION` references, and reading one model and layer of the embeddings table, at its current
version or an earlier one (Delta time travel), through `TableStore`.

Every check a user can fix (a model or layer the table lacks, an unknown track id, a version the table never had)
runs on cheap columns before any vector is read. Vectors holding NaN or infinite values (the pipeline never writes
them; another tool can) are left out where they are read, counted in one warning, so no command ranks, indexes,
projects or compares them.

Every read goes through the store's reader (`arrow_dataset`), which keeps Arrow's I/O threads out of Python: a scan
through deltalake's own filesystem can abort the process at exit, after a correct answer or a correct error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable

from catalog_embed.pipelines.analysts.query import filter_rows
from catalog_embed.pipelines.io.storage import add_storage_option_argument, storage_options_from_args
from catalog_embed.pipelines.io.store import TableStore, arrow_dataset
from catalog_embed.schemas.errors import ConfigError, TableError
from catalog_embed.schemas.tables import EMBEDDINGS, EXTRA_LAYER_PREFIX
from catalog_embed.workers.analysis import unit_rows


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """`--out` and `--storage-option`, as `embed` takes them."""
    parser.add_argument("--out", required=True, metavar="URI", help="output root given to `embed`")
    add_storage_option_argument(parser)


def store_from_args(args: argparse.Namespace, out: str | None = None) -> TableStore:
    """The table store under `--out` (or `out`) with the parsed storage options."""
    return TableStore(out or args.out, storage_options_from_args(args))


@dataclass(frozen=True)
class ModelRef:
    """A model in the embeddings table, at the current table version or at Delta version `version`."""

    model: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """`MODEL` or `MODEL@VERSION` (VERSION: a Delta table version, see `DESCRIBE HISTORY`)."""
        model, at, version = text.partition("@")
        if not model or (at and not version.isdigit()):
            msg = f"{text!r} is not MODEL or MODEL@VERSION (VERSION a Delta table version number, e.g. musicnn-msd@3)"
            raise ConfigError(msg)
        return cls(model, int(version) if at else None)

    def __str__(self) -> str:
        return self.model if self.version is None else f"{self.model}@{self.version}"


@dataclass(frozen=True)
class Vectors:
    """Live embeddings of one model and layer.

    Attributes:
        model, layer: what they are.
        table_version: the Delta version of the embeddings table they were read at.
        track_ids: (n,) object array of track ids.
        vectors: (n, dim) float32, unit rows (cosine similarity is their inner product).
        embedded_at: (n,) int64 microseconds since the epoch, which changes whenever a row is replaced.
        raw: (n, dim) float32 as stored, when asked for (probes and CKA use the encoder's own scale).
        skipped: track id -> embedded_at of the rows read but left out for NaN or infinite values.
    """

    model: str
    layer: str
    table_version: int
    track_ids: np.ndarray
    vectors: np.ndarray
    embedded_at: np.ndarray
    raw: np.ndarray | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows_of(self, track_ids: list[str]) -> np.ndarray:
        """The rows of `track_ids`, live tracks of the table (see `require_tracks`).

        Raises:
            ConfigError: some were left out for NaN or infinite values.
        """
        row_of = {t: r for r, t in enumerate(self.track_ids)}
        missing = [t for t in track_ids if t not in row_of]
        if missing:
            raise non_finite_error(missing, self.model, self.layer)
        return np.array([row_of[t] for t in track_ids], dtype=np.int64)

    def take(self, rows: np.ndarray) -> Vectors:
        """The subset at `rows`, in that order."""
        return Vectors(self.model, self.layer, self.table_version, self.track_ids[rows], self.vectors[rows],
                       self.embedded_at[rows], None if self.raw is None else self.raw[rows], self.skipped)


class ModelLayer:
    """One model and layer of the embeddings table under a store, resolved and checked on construction.

    Args:
        store: the tables.
        model: the model (the table's only one when None).
        layer: the layer: that of the `embedding` column or an extra `embedding_<layer>` column (the model's only
            layer when None).
        version: a Delta version of the embeddings table (the current one when None).

    Raises:
        TableError: no embeddings table, or a version it never had.
        ConfigError: the model or layer is absent or ambiguous; the message lists the choices.
    """

    def __init__(self, store: TableStore, model: str | None, layer: str | None = None,
                 version: int | None = None) -> None:
        self.store = store
        self.table: DeltaTable = store.table(EMBEDDINGS)
        latest = self.table.version()
        if version is not None:
            if not 0 <= version <= latest:
                msg = f"{store.uri(EMBEDDINGS)} has versions 0 to {latest}, not {version}: fix MODEL@VERSION"
                raise TableError(msg)
            self.table.load_as_version(version)
        self.version = self.table.version()
        models = sorted({p["model"] for p in self.table.partitions()})
        if model is None:
            if len(models) != 1:
                msg = f"the embeddings table holds models {', '.join(models) or '(none)'}: pass --model with one"
                raise ConfigError(msg)
            model = models[0]
        if model not in models:
            where = f" at version {version}" if version is not None else ""
            msg = (
                f"model {model!r} is not in {store.uri(EMBEDDINGS)}{where}; it holds: {', '.join(models) or '(none)'} "
                f"(fix --model, or embed it with `catalog-embed embed --model {model}`)"
            )
            raise ConfigError(msg)
        self.model = model
        self.dataset: pads.Dataset = arrow_dataset(
            self.table, store.storage_options, file_pruning_predicate=[("model", "=", model)]
        )
        self.layer, self.column = self._resolve_layer(layer)
        self._warned = False

    def _resolve_layer(self, layer: str | None) -> tuple[str, str]:
        rows = self.dataset.to_table(columns=["layer"], filter=~pc.field("deleted"))
        layers = sorted(pc.unique(rows["layer"].cast(pa.string())).to_pylist())
        if not layers:
            msg = f"model {self.model!r} has no live rows in {self.store.uri(EMBEDDINGS)}: embed some tracks first"
            raise TableError(msg)
        extra = sorted(n.removeprefix(EXTRA_LAYER_PREFIX) for n in self.dataset.schema.names
                       if n.startswith(EXTRA_LAYER_PREFIX))
        if layer is None:
            if len(layers) > 1:
                msg = f"model {self.model!r} has rows of several layers ({', '.join(layers)}): pass --layer"
                raise ConfigError(msg)
            return layers[0], "embedding"
        if layer in layers:
            return layer, "embedding"
        if layer in extra:
            return layer, EXTRA_LAYER_PREFIX + layer
        msg = f"model {self.model!r} has no layer {layer!r}; choose --layer from: {', '.join(layers + extra)}"
        raise ConfigError(msg)

    @property
    def live(self) -> pc.Expression:
        """Rows of this layer that are not deleted."""
        live = ~pc.field("deleted")
        if self.column == "embedding":
            return live & (pc.field("layer").cast(pa.string()) == self.layer)
        return live & pc.field(self.column).is_valid()

    def keys(self) -> pa.Table:
        """(track_id, embedded_at) of every live row, without reading a vector."""
        table = self.dataset.to_table(columns=["track_id", "embedded_at"], filter=self.live)
        return pa.table({"track_id": table["track_id"].cast(pa.string()),
                         "embedded_at": table["embedded_at"].cast(pa.int64())})

    def versions(self) -> list[str]:
        """The model versions of this layer's live rows, without reading a vector."""
        rows = self.dataset.to_table(columns=["model_version"], filter=self.live)
        return sorted(pc.unique(rows["model_version"].cast(pa.string())).to_pylist())

    def dim(self) -> int:
        """The length of this layer's vectors, from the first live row."""
        for batch in self.dataset.scanner(columns=[self.column], filter=self.live, batch_size=1).to_batches():
            if batch.num_rows:
                return len(batch[self.column][0])
        msg = f"model {self.model!r} has no live rows of layer {self.layer!r}: embed some tracks first"
        raise TableError(msg)

    def read(self, track_ids: pa.Array | None = None, dataset: pads.Dataset | None = None,
             raw: bool = False) -> Vectors:
        """Live vectors, all of them or those of `track_ids`, from this snapshot or from `dataset` (a subset of
        its files), with the stored vectors too when `raw`; rows come sorted by track id."""
        source = dataset if dataset is not None else self.dataset
        filter_ = self.live
        parts = []
        for batch in source.scanner(columns=["track_id", "embedded_at", self.column], filter=filter_).to_batches():
            ids = batch["track_id"].cast(pa.string())
            if track_ids is not None:
                batch = batch.filter(pc.is_in(ids, value_set=track_ids))
                ids = batch["track_id"].cast(pa.string())
            if batch.num_rows:
                parts.append((ids, batch["embedded_at"].cast(pa.int64()), batch[self.column]))
        if not parts:
            return Vectors(self.model, self.layer, self.version, np.array([], dtype=object),
                           np.zeros((0, 0), np.float32), np.array([], np.int64))
        ids = pa.concat_arrays([p[0] for p in parts])
        order = pc.sort_indices(ids).to_numpy()
        lists = pa.concat_arrays([p[2] for p in parts])
        lengths = pc.list_value_length(lists).to_numpy()
        if len(set(lengths.tolist())) != 1:
            msg = f"embeddings of {self.model!r}/{self.layer!r} differ in length ({sorted(set(lengths.tolist()))})"
            raise TableError(msg)
        matrix = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), lengths[0])
        track_ids = np.asarray(ids.to_pylist(), dtype=object)[order]
        embedded_at = pa.concat_arrays([p[1] for p in parts]).to_numpy()[order]
        matrix = matrix[order]
        finite = np.isfinite(matrix).all(axis=1)
        skipped = dict(zip(track_ids[~finite].tolist(), embedded_at[~finite].tolist(), strict=True))
        if skipped:
            self._warn(skipped)
            track_ids, embedded_at, matrix = track_ids[finite], embedded_at[finite], matrix[finite]
        return Vectors(self.model, self.layer, self.version, track_ids, unit_rows(matrix), embedded_at,
                       matrix if raw else None, skipped)

    def _warn(self, skipped: dict[str, int]) -> None:
        """One warning per model and layer, however many reads find such rows."""
        if self._warned:
            return
        self._warned = True
        shown = ", ".join(list(skipped)[:3]) + (" ..." if len(skipped) > 3 else "")
        print(
            f"catalog-embed: warning: left out {len(skipped)} row(s) of {self.model}/{self.layer} whose vectors hold "
            f"NaN or infinite values ({shown}): another tool wrote them; re-embed those tracks",
            file=sys.stderr,
        )

    def matching(self, where: str) -> pa.Array:
        """Track ids of live rows for which `where`, one SQL expression over the table's columns, holds (DuckDB, in
        the sandbox `query` uses: see `filter_rows`).

        Raises:
            QueryError: `where` is not one expression over the columns, reaches beyond them, or fails.
        """
        names = [n for n in self.dataset.schema.names if not n.startswith("embedding")]
        rows = self.dataset.to_table(columns=names, filter=self.live)
        plain = pa.schema([f.with_type(pa.string()) if f.type == pa.string_view() else f for f in rows.schema])
        return filter_rows(rows.cast(plain), "embeddings", where, "--where")["track_id"].combine_chunks()


def non_finite_error(track_ids: list[str], model: str, layer: str) -> ConfigError:
    """The error for query tracks whose vectors were left out for NaN or infinite values."""
    shown = ", ".join(track_ids[:5]) + (" ..." if len(track_ids) > 5 else "")
    msg = (
        f"{len(track_ids)} track(s) have NaN or infinite values in their {model}/{layer} vector, so they have no "
        f"neighbours: {shown} (re-embed them, or query other tracks)"
    )
    return ConfigError(msg)


def require_tracks(wanted: list[str], known: pa.Array, model: str) -> None:
    """Raise a one-line ConfigError naming unknown track ids (with examples of known ones) before any search."""
    missing = pc.filter(pa.array(wanted, pa.string()), pc.invert(pc.is_in(pa.array(wanted, pa.string()),
                                                                          value_set=known)))
    if len(missing):
        shown = ", ".join(missing.to_pylist()[:5])
        examples = ", ".join(known.slice(0, 3).to_pylist())
        msg = (
            f"{len(missing)} track id(s) not among the live tracks of {model!r}: {shown} "
            f"(ids look like {examples}; check the id, or embed the track first)"
        )
        raise ConfigError(msg)
