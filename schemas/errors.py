"""Named errors shared by every layer.

Each error says what went wrong and, where the user can act, what to change. Errors raised while processing one
track become a `failures` row (see `catalog_embed.schemas.tables.FAILURES`); errors raised while configuring or planning a run
stop it before any audio is read.

Each error carries the command line's exit code for it (`exit_code`), so that a scheduler can tell "fix the
command" (2, the default) from "the run is broken as a whole" (1) and "run again and it resumes" (75, EX_TEMPFAIL
of sysexits.h: `RetryableError`).
"""

from __future__ import annotations

# sysexits.h: a temporary failure; the user is invited to retry.
EX_TEMPFAIL = 75


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first non-empty line of an error's message, for one-line errors that quote another library's: deltalake
    appends a Rust backtrace when RUST_BACKTRACE is set, DuckDB and transformers add hints on further lines.

    Args:
        exc: the error.
        with_type: prefix the error's class name (where the message alone would not say what failed).
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]


class CatalogEmbedError(Exception):
    """Base class of every error this project raises on purpose.

    Attributes:
        exit_code: the command line's exit status for this error: 2, an error the user can fix.
    """

    exit_code = 2


class ConfigError(CatalogEmbedError):
    """The run's configuration is invalid; raised before any work starts."""


class ManifestError(CatalogEmbedError):
    """The catalog manifest is unreadable or violates its contract (columns, ids, rows)."""


class TrackError(CatalogEmbedError):
    """A single track could not be processed. Becomes one `failures` row; the run goes on."""

    stage = "unknown"


class SourceReadError(TrackError):
    """The audio file could not be read from its storage (missing, permission, too large)."""

    stage = "read"


class AudioDecodeError(TrackError):
    """The bytes are not decodable audio (corrupt, truncated, empty, not audio)."""

    stage = "decode"


class AudioTooShortError(TrackError):
    """The audio is shorter than the minimum duration the encoder can embed meaningfully."""

    stage = "decode"


class AudioTooLongError(TrackError):
    """The audio exceeds the configured maximum duration."""

    stage = "decode"


class FrontEndError(TrackError):
    """The feature front end failed on this track's audio."""

    stage = "frontend"


class EncoderError(CatalogEmbedError):
    """An encoder cannot be built: unknown name, missing or mismatching weights, unavailable device."""


class WeightsError(EncoderError):
    """Weights are missing, corrupt, unsafe to load, or do not match the pinned sha256."""


class TableError(CatalogEmbedError):
    """A Delta table is missing, has an unexpected schema, or a commit failed."""


class WorkerError(CatalogEmbedError):
    """A worker process could not start (its setup failed): the run cannot proceed on this machine."""


class RunAbortedError(CatalogEmbedError):
    """The run was stopped as a whole, e.g. because too many tracks failed (exit 1: retrying repeats it)."""

    exit_code = 1


class RetryableError(CatalogEmbedError):
    """The run stopped for a reason outside it and left its staging resumable: the same command run again resumes
    it (exit 75, EX_TEMPFAIL)."""

    exit_code = EX_TEMPFAIL


class RunLostError(RetryableError):
    """A run lost its staging while it ran (taken over by another run, or removed): it commits nothing."""


class StorageUnavailableError(RetryableError):
    """The object store kept failing (throttled, unreachable, stalled) after its clients' retries and ours: the run
    stopped with nothing committed half-way; run again once the store answers."""


class LabelsError(CatalogEmbedError):
    """A labels table is unreadable or does not fit the probe task (columns, types, ids, splits)."""


class ProbeError(CatalogEmbedError):
    """A probe cannot be trained or applied: unusable data, a diverged search, a missing or mismatching probe."""


class MissingExtraError(ConfigError):
    """An optional dependency is not installed; the message names the extra (`pip install 'catalog-embed[x]'`)."""


class QueryError(CatalogEmbedError):
    """A SQL statement (`query`) or fragment (`similar --where`) is empty, malformed, or reaches beyond what it may
    read."""


class OutputError(CatalogEmbedError):
    """An output file cannot be written where the user asked: a folder, a missing folder, a file of a table, a place
    this user cannot write."""


class AnnIndexError(CatalogEmbedError):
    """An ANN index folder is damaged, or its `index.json` names files outside the folder."""
