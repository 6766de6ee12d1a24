"""The README's Python API example runs as written: extracted from README.md and run as a script on a small
catalog, so the documentation cannot drift from the API."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from catalog_embed.pipelines.analysts.query import connect
from tests.helpers.faults import ROOT, expected_tracks


def _api_example() -> str:
    """The Python block of the README's "The Python API" section."""
    section = (ROOT / "README.md").read_text().split("## The Python API\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return block


def test_the_readme_python_api_example_runs(small_catalog, small_labels, tmp_path):
    script = tmp_path / "embed_catalog.py"
    script.write_text(_api_example())
    out = tmp_path / "tables"
    done = subprocess.run(
        [sys.executable, str(script), str(small_catalog.manifest_path), str(out)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path, capture_output=True, text=True, timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    good, bad = expected_tracks(small_labels)
    run_id, status, n_embedded, n_failed = done.stdout.split()
    assert (status, int(n_embedded), int(n_failed)) == ("succeeded", len(good), len(bad))
    assert f"+{len(good) + len(bad)} tracks" in done.stderr  # the progress callback (the local runner's one shard)
    assert connect(str(out)).execute("SELECT run_id, status FROM runs").fetchall() == [(run_id, "succeeded")]
