"""Planning: diff the catalog against what the tables already hold, so a run embeds only what changed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from catalog_embed.pipelines.embed.config import EmbedConfig, from_saved
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import ConfigError, TableError
from catalog_embed.schemas.records import MISSING_FINGERPRINT, REFUSED_FINGERPRINT, WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS, FAILURES, RUNS, WINDOWS

# Failures at these stages are properties of the file itself: retrying an unchanged file would fail the same way.
# Read failures (permissions, network) are retried by every run, except for a file that is still missing.
_DETERMINISTIC_STAGES = ("decode", "frontend")
_STILL_BAD = (MISSING_FINGERPRINT, REFUSED_FINGERPRINT)
# Failures that a run's limits caused rather than the file alone: retried once the limits they met have changed.
LIMIT_ERRORS = ("AudioTooLongError", "AudioTooShortError", "DecodeTimeout", "DecodeOutOfMemory")


@dataclass(frozen=True)
class RunLimits:
    """The options that decide limit failures (`LIMIT_ERRORS`): durations, decode memory and timeout."""

    max_duration_s: float
    min_duration_s: float
    max_memory_mb: float
    decode_timeout_s: float

    @classmethod
    def of(cls, config: EmbedConfig) -> RunLimits:
        """The limits of a run's config."""
        decode = config.decode
        return cls(decode.max_duration_s, decode.min_duration_s, decode.max_memory_mb, config.decode_timeout_s)


@dataclass(frozen=True)
class Request:
    """What a run asks of each track's row, beyond its fingerprint and the encoder's identity.

    Attributes:
        layers: the layers it writes: a row embedded with another first layer, or without one of the others, is
            embedded again.
        windows: whether it writes the `windows` timeline: a track without one (of the first layer) is embedded
            again.
        limits: the options that decide limit failures (`LIMIT_ERRORS`): durations, decode memory and timeout
            (read failures, a file over --max-file-mb among them, are retried by every run anyway). A track that failed under other limits is retried.
    """

    layers: tuple[str, ...]
    windows: bool
    limits: RunLimits


def read_state(store: TableStore, model: str, request: Request) -> tuple[pa.Table, pa.Table]:
    """What the tables hold for `model`, shaped for `plan_run`; empty when the tables do not exist yet.

    Returns:
        embedded: track_id, source_fingerprint, model_version, feature_hash, deleted, and `covered` (the row has
            what `request` asks for).
        failed: track_id, source_fingerprint, stage, and `limits_changed` (a limit failure under other limits).
    """
    embedded_columns = ["track_id", "source_fingerprint", "model_version", "feature_hash", "deleted"]
    if store.exists(EMBEDDINGS):
        # Vectors are read only for the extra layers asked for (their presence is the question), never the main one.
        stored = set(pa.schema(store.table(EMBEDDINGS).schema()).names)
        extra = [f"embedding_{layer}" for layer in request.layers[1:]]
        columns = [*embedded_columns, "layer", *(c for c in extra if c in stored)]
        rows = store.read(EMBEDDINGS, columns, partition={"model": model})
        covered = pc.equal(rows["layer"], request.layers[0])
        for column in extra:
            has = pc.is_valid(rows[column]) if column in rows.column_names else pa.repeat(False, rows.num_rows)
            covered = pc.and_(covered, has)
        if request.windows:
            timelines = _windows_of(store, model, request.layers[0])
            covered = pc.and_(covered, pc.is_in(rows["track_id"], timelines))
        embedded = rows.select(embedded_columns).append_column("covered", covered)
    else:
        schema = EMBEDDINGS.schema
        embedded = pa.schema([schema.field(c) for c in embedded_columns] + [pa.field("covered", pa.bool_())])
        embedded = embedded.empty_table()
    failed_columns = ["track_id", "source_fingerprint", "stage"]
    if store.exists(FAILURES):
        failed = store.read(FAILURES, [*failed_columns, "error_type", "run_id"], pc.field("model") == model)
    else:
        failed = pa.schema([FAILURES.schema.field(c) for c in [*failed_columns, "error_type", "run_id"]]).empty_table()
    changed = _runs_with_other_limits(store, set(failed["run_id"].to_pylist()), request.limits)
    limits_changed = pc.and_(pc.is_in(failed["error_type"], pa.array(LIMIT_ERRORS)), pc.is_in(failed["run_id"], changed))
    return embedded, failed.select(failed_columns).append_column("limits_changed", limits_changed)


def _windows_of(store: TableStore, model: str, layer: str) -> pa.Array:
    if not store.exists(WINDOWS):
        return pa.array([], pa.string())
    rows = store.read(WINDOWS, ["track_id", "layer"], pc.field("model") == model)
    return rows.filter(pc.equal(rows["layer"], layer))["track_id"].combine_chunks()


def _runs_with_other_limits(store: TableStore, run_ids: set[str], limits: RunLimits) -> pa.Array:
    """The runs among `run_ids` whose recorded config had other limits than `limits`.

    Raises:
        TableError: a runs row's config does not read back as this release's `EmbedConfig`.
    """
    if not run_ids or not store.exists(RUNS):
        return pa.array([], pa.string())
    runs = store.read(RUNS, ["run_id", "config_json"], pc.is_in(pc.field("run_id"), pa.array(sorted(run_ids))))
    changed = []
    for run_id, saved in zip(runs["run_id"].to_pylist(), runs["config_json"].to_pylist(), strict=True):
        try:
            config = from_saved(EmbedConfig, json.loads(saved))
        except (ConfigError, ValueError) as exc:
            msg = f"{store.uri(RUNS)}: the config of run {run_id} does not read back ({exc}): write to a new --out"
            raise TableError(msg) from exc
        if RunLimits.of(config) != limits:
            changed.append(run_id)
    return pa.array(changed, pa.string())


@dataclass(frozen=True)
class Plan:
    """What a run will do.

    Attributes:
        items: tracks to embed.
        refused: tracks whose URI the policy refuses, with the reason, to record as failures.
        gone: track ids with a live embedding or a failure that left the catalog: embeddings are marked deleted
            (or pruned), failures removed.
        n_known: track ids with a live embedding or a failure before the run (what `gone` is a share of).
        listed: every catalog row's track_id, uri and fingerprint (what a resumed run's staged rows must match).
    """

    items: tuple[WorkItem, ...]
    refused: tuple[tuple[WorkItem, str], ...]
    gone: tuple[str, ...]
    n_known: int
    n_catalog: int
    n_new: int
    n_changed: int
    n_unchanged: int
    n_known_bad: int
    listed: pa.Table

    @property
    def n_skipped(self) -> int:
        """Tracks the run leaves alone."""
        return self.n_unchanged + self.n_known_bad

    def listed_files(self) -> dict[str, tuple[str, str]]:
        """Track id -> (uri, fingerprint) of every track the catalog lists now, the ones the run leaves alone
        included: a resumed run whose commit had begun finds tracks it staged already in the tables, unchanged."""
        columns = (self.listed[name].to_pylist() for name in ("track_id", "uri", "fingerprint"))
        return {track: (uri, fingerprint) for track, uri, fingerprint in zip(*columns, strict=True)}

    def check_prune(self, max_share: float) -> None:
        """Refuse a prune that would delete more than `max_share` of the model's tracks.

        Raises:
            ConfigError: naming the share and the flag that confirms it.
        """
        if self.gone and len(self.gone) > max_share * self.n_known:
            msg = (
                f"--prune would delete {len(self.gone)} of the model's {self.n_known} tracks "
                f"({len(self.gone) / self.n_known:.0%}), more than --prune-max-share {max_share:g}: check that the "
                f"catalog is complete, or confirm with --prune-max-share 1"
            )
            raise ConfigError(msg)

    @property
    def has_work(self) -> bool:
        """Whether the run changes any table."""
        return bool(self.items or self.refused or self.gone)

    @classmethod
    def joined(cls, plans: tuple[Plan, ...]) -> Plan:
        """The plans of one catalog for several encoders as one: the tracks any of them embeds (in the order they
        plan them) or refuses, and every count per (encoder, track)."""
        if len(plans) == 1:
            return plans[0]
        items = {item.track_id: item for plan in plans for item in plan.items}
        refused = {item.track_id: (item, why) for plan in plans for item, why in plan.refused}
        return cls(
            items=tuple(items.values()),
            refused=tuple(refused.values()),
            gone=tuple(track for plan in plans for track in plan.gone),
            n_catalog=plans[0].n_catalog,
            listed=plans[0].listed,
            **{
                name: sum(getattr(plan, name) for plan in plans)
                for name in ("n_known", "n_new", "n_changed", "n_unchanged", "n_known_bad")
            },
        )

    def describe(self) -> str:
        """One line for humans."""
        return (
            f"{self.n_catalog} tracks in the catalog: {self.n_new} new, {self.n_changed} changed, "
            f"{self.n_unchanged} unchanged, {self.n_known_bad} known bad (unchanged since they failed), "
            f"{len(self.refused)} refused by the URI policy; {len(self.gone)} gone from the catalog"
        )


def plan_run(
    catalog: pa.Table,
    fingerprints: list[str],
    embedded: pa.Table,
    failed: pa.Table,
    model_version: str,
    feature_hash: str,
    retry_failed: bool = False,
) -> Plan:
    """Decide which catalog tracks to embed.

    A track is embedded when it has no live embedding for this model, its source fingerprint, the encoder's
    version or the front end's hash differ from its row, or its row lacks what the run asks for (a layer, the
    timeline). A track that failed deterministically with the same fingerprint is skipped unless `retry_failed`
    or the limits it failed on have changed since.

    Args:
        catalog: validated catalog (`track_id`, `uri`, `refused`).
        fingerprints: one per catalog row (`REFUSED_FINGERPRINT` for refused rows).
        embedded: this model's `embeddings` state (see `read_state`).
        failed: this model's `failures` state (see `read_state`).
        model_version: the encoder's current version.
        feature_hash: the front end's current hash.
        retry_failed: retry known-bad tracks even when unchanged.
    """
    # The diff is a join of columns, never a dict per row: a catalog holds millions of tracks.
    live = embedded.filter(pc.invert(embedded["deleted"]))
    bad = pc.or_(
        pc.is_in(failed["stage"], pa.array(_DETERMINISTIC_STAGES)),
        pc.is_in(failed["source_fingerprint"], pa.array(_STILL_BAD)),
    )
    known_bad = failed.filter(pc.and_(bad, pc.invert(failed["limits_changed"])))
    rows = pa.table(
        {
            "row": pa.array(range(catalog.num_rows), pa.int64()),
            "track_id": catalog["track_id"],
            "uri": catalog["uri"],
            "fingerprint": pa.array(fingerprints, pa.string()),
            "reason": catalog["refused"],
        }
    )
    current = live.select(["track_id", "source_fingerprint", "model_version", "feature_hash", "covered"])
    rows = rows.join(current.append_column("live", pa.repeat(True, current.num_rows)), "track_id")
    rows = rows.join(
        known_bad.select(["track_id", "source_fingerprint"]).rename_columns(["track_id", "bad_fingerprint"]),
        "track_id",
    )
    rows = rows.sort_by("row")  # joins do not keep the catalog's order
    refused_rows = pc.is_valid(rows["reason"])
    was_refused = pc.equal(rows["bad_fingerprint"], REFUSED_FINGERPRINT).fill_null(False)
    unchanged = pc.and_(
        pc.and_(
            pc.equal(rows["source_fingerprint"], rows["fingerprint"]), pc.equal(rows["model_version"], model_version)
        ),
        pc.and_(pc.equal(rows["feature_hash"], feature_hash), rows["covered"]),
    ).fill_null(False)
    still_bad = pc.equal(rows["bad_fingerprint"], rows["fingerprint"]).fill_null(False)
    if retry_failed:
        still_bad = pa.repeat(False, rows.num_rows)
    looked_at = pc.invert(refused_rows)
    skipped_bad = pc.and_(pc.and_(looked_at, pc.invert(unchanged)), still_bad)
    embed = pc.and_(pc.and_(looked_at, pc.invert(unchanged)), pc.invert(still_bad))
    new = pc.and_(embed, pc.is_null(rows["live"]))
    to_refuse = rows.filter(pc.and_(refused_rows, pc.invert(was_refused)))
    to_embed = rows.filter(embed)
    items = [
        WorkItem(track_id, uri, fingerprint)
        for track_id, uri, fingerprint in zip(
            to_embed["track_id"].to_pylist(), to_embed["uri"].to_pylist(), to_embed["fingerprint"].to_pylist(), strict=True
        )
    ]
    refused = [
        (WorkItem(track_id, uri, REFUSED_FINGERPRINT), reason)
        for track_id, uri, reason in zip(
            to_refuse["track_id"].to_pylist(), to_refuse["uri"].to_pylist(), to_refuse["reason"].to_pylist(), strict=True
        )
    ]
    n_new = _count(new)
    known = pc.unique(pa.chunked_array([live["track_id"], failed["track_id"]], pa.string()))
    gone = known.filter(pc.invert(pc.is_in(known, catalog["track_id"])))
    return Plan(
        items=tuple(items),
        refused=tuple(refused),
        gone=tuple(sorted(gone.to_pylist())),
        n_known=len(known),
        n_catalog=catalog.num_rows,
        n_new=n_new,
        n_changed=_count(embed) - n_new,
        n_unchanged=_count(pc.and_(looked_at, unchanged)),
        n_known_bad=_count(skipped_bad) + _count(pc.and_(refused_rows, was_refused)),
        listed=rows.select(["track_id", "uri", "fingerprint"]),
    )


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
