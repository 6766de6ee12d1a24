"""The records the stages pass around: a track to embed, and what came of it (its embeddings or its failure).

They are contracts between the job layer, the runners and the workers, so they live here with the table schemas
and import nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Fingerprint stands for a file that could not be stat-ed; such a track is planned and fails with its reason.
MISSING_FINGERPRINT = "missing"
# Fingerprint of a row whose URI the policy refuses: the file is never touched, not even stat-ed.
REFUSED_FINGERPRINT = "refused"


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One track to embed: the unit every runner shards, decodes and reports on.

    Slotted: a plan of a million-track catalog holds a million of them, and an instance dict would double each.
    """

    track_id: str
    uri: str
    fingerprint: str


@dataclass
class TrackFailure:
    """A track that could not be embedded, with the stage and reason."""

    item: WorkItem
    stage: str
    error_type: str
    message: str

    @classmethod
    def from_error(cls, item: WorkItem, error: BaseException, stage: str | None = None) -> TrackFailure:
        """Describe `error` raised while processing `item`."""
        return cls(
            item=item,
            stage=stage or getattr(error, "stage", "unknown"),
            error_type=type(error).__name__,
            message=str(error) or repr(error),
        )


@dataclass
class TrackEmbedding:
    """A track's pooled embeddings (one vector per requested layer) and optional timeline."""

    item: WorkItem
    duration_s: float
    n_windows: int
    pooled: dict[str, np.ndarray]  # layer -> (dim,) float32
    timeline: np.ndarray | None = None  # (n_windows, dim) of the first layer
    starts: list[float] = field(default_factory=list)

