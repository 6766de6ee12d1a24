"""Planning: diff the catalog against what the tables already hold, so a run embeds only what changed."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from schemas.manifest import MISSING_FINGERPRINT, REFUSED_FINGERPRINT, WorkItem

# Failures at these stages are properties of the file itself: retrying an unchanged file would fail the same way.
# Read failures (permissions, network) are retried by every run, except for a file that is still missing.
_DETERMINISTIC_STAGES = ("decode", "frontend")
_STILL_BAD = (MISSING_FINGERPRINT, REFUSED_FINGERPRINT)


@dataclass(frozen=True)
class Plan:
    """What a run will do.

    Attributes:
        items: tracks to embed.
        refused: tracks whose URI the policy refuses, with the reason, to record as failures.
        gone: track ids with a live embedding or a failure that left the catalog: embeddings are marked deleted
            (or pruned), failures removed.
    """

    items: tuple[WorkItem, ...]
    refused: tuple[tuple[WorkItem, str], ...]
    gone: tuple[str, ...]
    n_catalog: int
    n_new: int
    n_changed: int
    n_unchanged: int
    n_known_bad: int

    @property
    def n_skipped(self) -> int:
        """Tracks the run leaves alone."""
        return self.n_unchanged + self.n_known_bad

    @property
    def has_work(self) -> bool:
        """Whether the run changes any table."""
        return bool(self.items or self.refused or self.gone)

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

    A track is embedded when it has no live embedding for this model, or its source fingerprint, the encoder's
    version or the front end's hash differ from its row. A track that failed deterministically with the same
    fingerprint is skipped unless `retry_failed`.

    Args:
        catalog: validated catalog (`track_id`, `uri`, `refused`).
        fingerprints: one per catalog row (`REFUSED_FINGERPRINT` for refused rows).
        embedded: this model's `embeddings` keys (track_id, source_fingerprint, model_version, feature_hash,
            deleted).
        failed: this model's `failures` keys (track_id, source_fingerprint, stage).
        model_version: the encoder's current version.
        feature_hash: the front end's current hash.
        retry_failed: retry known-bad tracks even when unchanged.
    """
    current = {
        row["track_id"]: (row["source_fingerprint"], row["model_version"], row["feature_hash"])
        for row in embedded.to_pylist()
        if not row["deleted"]
    }
    known_bad = {
        row["track_id"]: row["source_fingerprint"]
        for row in failed.to_pylist()
        if row["stage"] in _DETERMINISTIC_STAGES or row["source_fingerprint"] in _STILL_BAD
    }
    items: list[WorkItem] = []
    refused: list[tuple[WorkItem, str]] = []
    n_new = n_changed = n_unchanged = n_known_bad = 0
    ids = catalog["track_id"].to_pylist()
    for track_id, uri, fingerprint, reason in zip(
        ids, catalog["uri"].to_pylist(), fingerprints, catalog["refused"].to_pylist(), strict=True
    ):
        if reason is not None:
            if known_bad.get(track_id) == REFUSED_FINGERPRINT:
                n_known_bad += 1
            else:
                refused.append((WorkItem(track_id, uri, REFUSED_FINGERPRINT), reason))
            continue
        have = current.get(track_id)
        if have == (fingerprint, model_version, feature_hash):
            n_unchanged += 1
            continue
        if not retry_failed and known_bad.get(track_id) == fingerprint:
            n_known_bad += 1
            continue
        if have is None:
            n_new += 1
        else:
            n_changed += 1
        items.append(WorkItem(track_id=track_id, uri=uri, fingerprint=fingerprint))
    in_catalog = set(ids)
    known = set(current) | set(failed["track_id"].to_pylist())
    return Plan(
        items=tuple(items),
        refused=tuple(refused),
        gone=tuple(sorted(known - in_catalog)),
        n_catalog=catalog.num_rows,
        n_new=n_new,
        n_changed=n_changed,
        n_unchanged=n_unchanged,
        n_known_bad=n_known_bad,
    )
