"""The probe jobs' tables: the embeddings they read, labels in files or Delta tables, and the predictions they
write, all through `TableStore` (storage options, schema checks, commit retries).

`catalog_embed.workers.probes` trains and scores on the arrays read here (`Embeddings`, an Arrow labels table) and builds
prediction rows; it never opens a table.
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from deltalake import DeltaTable

from catalog_embed.pipelines.io.store import TableStore, arrow_dataset, table_at
from catalog_embed.schemas.errors import ConfigError, LabelsError, TableError
from catalog_embed.schemas.tables import EMBEDDINGS, EXTRA_LAYER_PREFIX, PREDICTIONS, TableSpec
from catalog_embed.workers.probes.data import GROUP_COLUMNS, Embeddings

# pyarrow's (and pandas') CSV null markers (NaN, NA, N/A, null, ...), less the empty cell.
_CSV_NULLS = [v for v in pacsv.ConvertOptions().null_values if v]


class EmbeddingsSource:
    """One model and one layer of an embeddings Delta table, resolved and checked on construction.

    Args:
        uri: the embeddings table (any URI deltalake reads), or the `--out` folder of `catalog-embed embed`
            holding it.
        model: the model to read; may be omitted only when the table holds a single model.
        layer: the layer to read: the `layer` of the `embedding` column, or an extra layer stored in
            `embedding_<layer>`; may be omitted when the model's rows carry a single layer.
        probe: the probe whose model and layer these are (`tag`), named in errors instead of --model/--layer.
        storage_options: deltalake storage options for the table (`--storage-option`).

    Raises:
        TableError: the URI is not a Delta table, lacks the embeddings columns, or has no live rows.
        ConfigError: the model or layer is ambiguous or absent; the message lists the choices.
    """

    def __init__(
        self,
        uri: str,
        model: str | None = None,
        layer: str | None = None,
        probe: str | None = None,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        out = TableStore(uri, storage_options)
        if not DeltaTable.is_deltatable(uri, storage_options=storage_options) and out.exists(EMBEDDINGS):
            store, spec = out, EMBEDDINGS
        else:
            store, spec = table_at(uri, EMBEDDINGS, storage_options)
        self.uri = store.uri(spec)
        self._probe = probe
        try:
            table = store.table(spec)
        except TableError as exc:
            msg = (
                f"no Delta table at {uri!r}: pass the embeddings table written by `catalog-embed embed` "
                "(or the --out folder given to it)"
            )
            raise TableError(msg) from exc
        self._dataset = arrow_dataset(table, store.storage_options)
        names = set(self._dataset.schema.names)
        missing = [c for c in ("model", "track_id", "layer", "embedding", "embedded_at", "deleted") if c not in names]
        if missing:
            msg = f"{uri!r} is not an embeddings table: it lacks column(s) {missing} of {EMBEDDINGS.schema.names}"
            raise TableError(msg)
        self.model = self._resolve_model(model)
        self.layer, self.column, self._filter = self._resolve_layer(layer)

    def _resolve_model(self, model: str | None) -> str:
        live = self._dataset.to_table(columns=["model"], filter=~pc.field("deleted"))
        models = sorted(pc.unique(live.column("model")).to_pylist())
        if not models:
            msg = f"the embeddings table {self.uri!r} has no live rows: embed some tracks first"
            raise TableError(msg)
        if model is None:
            if len(models) > 1:
                msg = (
                    f"the embeddings table {self.uri!r} holds several models ({', '.join(models)}): "
                    f"pass --model with one of them"
                )
                raise ConfigError(msg)
            return models[0]
        if model not in models:
            fix = (
                f"pass the embeddings of the model probe {self._probe} was trained on"
                if self._probe
                else "fix --model"
            )
            msg = f"model {model!r} has no live rows in {self.uri!r}; it holds: {', '.join(models)} ({fix})"
            raise ConfigError(msg)
        return model

    def _resolve_layer(self, layer: str | None) -> tuple[str, str, pc.Expression]:
        live = (pc.field("model") == self.model) & ~pc.field("deleted")
        layers = sorted(pc.unique(self._dataset.to_table(columns=["layer"], filter=live).column("layer")).to_pylist())
        extra = sorted(
            n[len(EXTRA_LAYER_PREFIX) :] for n in self._dataset.schema.names if n.startswith(EXTRA_LAYER_PREFIX)
        )
        if layer is None:
            if len(layers) > 1:
                msg = f"model {self.model!r} has rows of several layers ({', '.join(layers)}): pass --layer"
                raise ConfigError(msg)
            layer = layers[0]
        if layer in layers:
            return layer, "embedding", live & (pc.field("layer") == layer)
        if layer in extra:
            column = EXTRA_LAYER_PREFIX + layer
            return layer, column, live & pc.field(column).is_valid()
        held = ", ".join(layers + extra)
        if self._probe:
            msg = (
                f"probe {self._probe} reads layer {layer!r} of model {self.model!r}, which {self.uri!r} lacks (it "
                f"holds: {held}): embed the catalog with --layer {layer} first"
            )
        else:
            msg = f"model {self.model!r} has no layer {layer!r} in {self.uri!r}; choose one of: {held}"
        raise ConfigError(msg)

    def batches(self, rows: int = 65536) -> Iterator[Embeddings]:
        """Stream the live embeddings in batches of at most `rows`."""
        scanner = self._dataset.scanner(
            columns=["track_id", "embedded_at", self.column], filter=self._filter, batch_size=rows
        )
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield self._to_embeddings(batch)

    def read(self) -> Embeddings:
        """All live embeddings of the model and layer at once."""
        table = self._dataset.to_table(columns=["track_id", "embedded_at", self.column], filter=self._filter)
        return self._to_embeddings(table)

    def _to_embeddings(self, data: pa.Table | pa.RecordBatch) -> Embeddings:
        column = data.column(self.column)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != dim).any():
            msg = f"embeddings of model {self.model!r}, layer {self.layer!r} in {self.uri!r} differ in length"
            raise TableError(msg)
        vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return Embeddings(
            track_ids=np.asarray(data.column("track_id").to_pylist(), dtype=object),
            vectors=vectors.reshape(len(lengths), dim),
            embedded_at=data.column("embedded_at").to_numpy(zero_copy_only=False).astype("datetime64[us]"),
        )


def read_labels(uri: str, storage_options: dict[str, str] | None = None) -> pa.Table:
    """Read a labels table from CSV, Parquet or Delta, with `track_id` as strings.

    `storage_options` reach a Delta table (files are read through fsspec, with the environment's credentials).

    Raises:
        LabelsError: the format cannot be told, the file cannot be read, or it has no `track_id` column.
    """
    lowered = uri.lower().rstrip("/")
    try:
        if lowered.endswith((".csv", ".csv.gz", ".tsv")):
            # Read ids and split/group columns as strings: numeric-looking ids must not become integers.
            as_text = {name: pa.string() for name in ("track_id", "split", *GROUP_COLUMNS)}
            parse = pacsv.ParseOptions(delimiter="\t" if lowered.endswith(".tsv") else ",")
            # NaN/NA cells are missing labels in text columns too (as pandas reads them), not classes. Empty text
            # stays text: an empty tag list is no tags, an empty class is missing (see `_missing_cells`).
            convert = pacsv.ConvertOptions(column_types=as_text, strings_can_be_null=True, null_values=_CSV_NULLS)
            with fsspec.open(uri, "rb", compression="infer") as fh:
                table = pacsv.read_csv(fh, parse_options=parse, convert_options=convert)
        elif lowered.endswith((".parquet", ".pq")):
            with fsspec.open(uri, "rb") as fh:
                table = pq.read_table(fh)
        elif DeltaTable.is_deltatable(uri, storage_options=storage_options):
            table = arrow_dataset(DeltaTable(uri, storage_options=storage_options), storage_options).to_table()
        else:
            msg = f"cannot tell the format of labels {uri!r}: use a .csv, .tsv or .parquet file or a Delta table"
            raise LabelsError(msg)
    except (OSError, pa.ArrowInvalid) as exc:
        msg = f"cannot read labels {uri!r}: {exc}"
        raise LabelsError(msg) from exc
    if "track_id" not in table.column_names:
        msg = f"labels {uri!r} have no 'track_id' column (columns: {', '.join(table.column_names)}): add or rename it"
        raise LabelsError(msg)
    return table.set_column(table.column_names.index("track_id"), "track_id", pc.cast(table["track_id"], pa.string()))


def predictions_table(uri: str, storage_options: dict[str, str] | None = None) -> tuple[TableStore, TableSpec]:
    """The store and spec of the predictions table at `uri` (`tag --out`, a probe job's predictions/)."""
    return table_at(uri, PREDICTIONS, storage_options)


def tagged(store: TableStore, spec: TableSpec, probe_id: str, model: str) -> dict[str, np.datetime64]:
    """track_id -> embedded_at of the rows probe `probe_id` already wrote for `model` (none without a table).

    Raises:
        TableError: the table is not a predictions table.
    """
    if not store.exists(spec):
        return {}
    store.check_columns(spec)
    rows = arrow_dataset(store.table(spec), store.storage_options).to_table(
        columns=["track_id", "embedded_at"],
        filter=(pc.field("probe_id") == probe_id) & (pc.field("model") == model),
    )
    stamps = rows.column("embedded_at").to_numpy(zero_copy_only=False).astype("datetime64[us]")
    return dict(zip(rows.column("track_id").to_pylist(), stamps, strict=True))


def delete_predictions(store: TableStore, spec: TableSpec, probe_id: str, model: str, track_ids: list[str]) -> None:
    """Remove probe `probe_id`'s rows for `model` and `track_ids` (tracks deleted from the embeddings)."""
    listed = ", ".join(_sql(t) for t in track_ids)
    store.delete(spec, f"probe_id = {_sql(probe_id)} AND model = {_sql(model)} AND track_id IN ({listed})")


def _sql(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
