"""Fault injection for the fault-tolerance suite: make a named point crash, hang or exit on demand.

`CATALOG_EMBED_FAILPOINTS` holds `point=action:match` entries separated by `;`, e.g.
`decode=segfault:track-07;decode=hang:track-09;commit.embeddings=exit`. When code reaches `hit(point, key)` and
`match` is a substring of `key` (or no match is given), the first such entry's action runs:

- `segfault`: the process dies of SIGSEGV, as FFmpeg does on some hostile streams;
- `hang`: the call never returns, as a decoder stuck in a loop;
- `exit`: the process ends at once with status 137, as under `kill -9` (no cleanup, no flush).

Unset (the default) it costs one dictionary lookup. Real decoders only crash on real hostile input that cannot be
shipped as a fixture, so the suite injects the crash at the exact place a decoder would.
"""

from __future__ import annotations

import os
import signal
import time
from functools import lru_cache

ENV = "CATALOG_EMBED_FAILPOINTS"


@lru_cache(maxsize=4)
def _parse(spec: str) -> dict[str, list[tuple[str, str]]]:
    points: dict[str, list[tuple[str, str]]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        point, _, action = entry.partition("=")
        action, _, match = action.partition(":")
        points.setdefault(point.strip(), []).append((action.strip(), match))
    return points


def hit(point: str, key: str = "") -> None:
    """Run the action configured for `point` when `key` matches; see the module docstring."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action = next((a for a, match in _parse(spec).get(point, []) if match in key), None)
    if action == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action == "exit":
        os._exit(137)
