"""Fault injection for the fault-tolerance suite: make a named point crash, hang, exit, raise or slow down on demand.

`CATALOG_EMBED_FAILPOINTS` holds `point=action:match` entries separated by `;`, e.g.
`decode=segfault:track-07;encode=raise:demo-0003;commit.embeddings=exit;write_shard=raise*1:000-000002` or
`decode=sleep(0.5)`. When code reaches `hit(point, key)` and `match` is a substring of `key` (or no match is given),
the first such entry's action runs:

- `segfault`: the process dies of SIGSEGV, as FFmpeg does on some hostile streams;
- `hang`: the call never returns, as a decoder stuck in a loop;
- `exit`: the process ends at once with status 137, as under `kill -9` (no cleanup, no flush);
- `raise`: `FailpointError` is raised, as a transient fault an engine retries (a preempted worker's lost bundle);
- `sleep(S)`: the call returns after S seconds, as a slow decoder or a slow store (so that a test's fault lands
  while a run is under way).

An action suffixed `*N` runs on the first N matching hits in a process only, so that a retry can succeed.

The points and their keys: `decode` (the track's URI, in the decode child), `encode` (the track id: the encoder
call of a batch holding that track raises), `write_shard` (the shard's part name, between its parts) and
`commit.<table>` (the commit's transaction id, before that table's commit).

Unset (the default) it costs one dictionary lookup. Real decoders only crash on real hostile input that cannot be
shipped as a fixture, so the suite injects the crash at the exact place a decoder would.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from functools import lru_cache

ENV = "CATALOG_EMBED_FAILPOINTS"
_hits: dict[tuple[str, str, str], int] = {}  # (point, action, match) -> matching hits so far in this process
_hits_lock = threading.Lock()  # engines such as Beam's DirectRunner run bundles on threads


class FailpointError(RuntimeError):
    """The fault a `raise` failpoint injects."""


@lru_cache(maxsize=4)
def _parse(spec: str) -> dict[str, list[tuple[str, int | None, str]]]:
    points: dict[str, list[tuple[str, int | None, str]]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        point, _, action = entry.partition("=")
        action, _, match = action.partition(":")
        action, _, times = action.strip().partition("*")
        points.setdefault(point.strip(), []).append((action, int(times) if times else None, match))
    return points


def hit(point: str, key: str = "") -> None:
    """Run the action configured for `point` when `key` matches; see the module docstring."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action = None
    for name, times, match in _parse(spec).get(point, []):
        if match in key:
            with _hits_lock:
                seen = _hits[point, name, match] = _hits.get((point, name, match), 0) + 1
            if times is None or seen <= times:
                action = name
            break
    if action == "raise":
        msg = f"failpoint {point} at {key!r}"
        raise FailpointError(msg)
    elif action == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action == "exit":
        os._exit(137)
    elif action is not None and action.startswith("sleep(") and action.endswith(")"):
        time.sleep(float(action.removeprefix("sleep(").removesuffix(")")))
