"""Transient storage errors: which errors an object store's clients give up with, and how they end a run.

The clients retry on their own, with backoff: botocore under s3fs (`s3_retries`, set for every s3fs filesystem of
this process by `configure_s3fs`), object_store under deltalake (its `max_retries`, `retry_timeout` and `timeout`
storage options) and the AWS SDK under Arrow's S3 filesystem, which reads tables' data files
(`catalog_embed.pipelines.io.store.arrow_s3`, from the same options). What they raise once their retries are spent
is a store that keeps failing (throttled, unreachable, stalled), not a bad track or a bad table:
`storage_unavailable` tells such an error apart, and the run ends with `StorageUnavailableError` (exit 75),
resumable, instead of a `failures` row or a traceback.

Our own retry (`retry_transient`, bounded, with full jitter) is only where no client retries: a decoder that
stopped mid-stream on a failed read (the decode is restarted whole) and the lease's heartbeat.
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec.config

from catalog_embed.schemas.errors import StorageUnavailableError

T = TypeVar("T")

# botocore's standard retry mode: exponential backoff with full jitter, on throttling (503 SlowDown), 5xx, resets
# and timeouts; its legacy default has no jitter and fewer attempts.
S3_RETRIES = {"mode": "standard", "max_attempts": 5}
# What s3fs raises for S3's throttling and server errors (503 SlowDown -> EBUSY, 500 -> EREMOTEIO) and sockets' own.
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ECONNRESET, errno.EPIPE}
# object_store (deltalake) and Arrow's S3 client (the AWS SDK) report an exhausted retry, a timeout or a dropped
# connection only in their messages; DuckDB passes a failed Arrow scan on as its own error with Arrow's message.
_TRANSIENT_MESSAGE = re.compile(
    r"error after \d+ retries|timed out|timeout was reached|error sending request|"
    r"connection (reset|closed|refused|aborted)|slow_?down|service unavailable|"
    r"AWS Error (NETWORK_CONNECTION|SERVICE_UNAVAILABLE|REQUEST_TIMEOUT|THROTTLING)|HTTP status 5\d\d|"
    r"failed to flush response stream",
    re.IGNORECASE,
)
# Where those messages come from (besides OSError, which the Python filesystems and Arrow raise).
_MESSAGE_MODULES = ("deltalake", "_duckdb", "duckdb")
# Colours and arrows deltalake puts in front of each cause of its error.
_DECORATION = re.compile(r"\x1b\[[0-9;]*m|↳")
# Not the store's state but the object's or the caller's: never retried, never resumable.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_ATTEMPTS = 3
_BACKOFF_S = 0.5


def configure_s3fs() -> None:
    """Give every s3fs filesystem this process creates botocore's standard retries (`S3_RETRIES`), keeping any
    `config_kwargs` the user set (`FSSPEC_S3` in the environment)."""
    options = fsspec.config.conf.setdefault("s3", {})
    options["config_kwargs"] = {"retries": S3_RETRIES, **options.get("config_kwargs", {})}


def _client_errors() -> tuple[type[BaseException], ...]:
    """botocore's connection and HTTP errors (resets, refusals, read timeouts): what s3fs raises once botocore's
    retries are spent. botocore is there when s3fs is (the [s3] extra)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return ()
    return (BotoConnectionError, HTTPClientError)


def storage_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the store is failing (throttled, unreachable, stalled) rather than that an object or a
    request is wrong."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, *_client_errors())):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    from_a_client = isinstance(exc, OSError) or type(exc).__module__.startswith(_MESSAGE_MODULES)
    return from_a_client and _TRANSIENT_MESSAGE.search(str(exc)) is not None


def unavailable_error(what: str, exc: BaseException) -> StorageUnavailableError:
    """The run-ending error for a store that kept failing while doing `what`."""
    # deltalake's message is a chain of causes, one a line, under a generic first line ("Generic S3 error"): name
    # the one that says what happened.
    lines = [_DECORATION.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    cause = next((line for line in lines if _TRANSIENT_MESSAGE.search(line)), lines[0] if lines else "")
    msg = (
        f"the object store kept failing while {what} ({type(exc).__name__}: {cause}): run the same command again "
        "once the store answers (an embed run resumes from its staging and commits each row once)"
    )
    return StorageUnavailableError(msg)


def retry_transient(call: Callable[[], T], what: str, attempts: int = _ATTEMPTS) -> T:
    """`call()`, tried again after a transient storage error (at most `attempts` tries, full-jitter exponential
    backoff); other errors pass through at once.

    Raises:
        StorageUnavailableError: the last try failed transiently too.
    """
    tries = 0
    while True:
        try:
            return call()
        except Exception as exc:
            tries += 1
            if not storage_unavailable(exc):
                raise
            if tries >= attempts:
                raise unavailable_error(what, exc) from exc
            time.sleep(random.uniform(0, _BACKOFF_S * 2**tries))
