"""The first hour: every error a user can fix is one line naming the fix, exit codes are 0, 2, 130 and 143 every
time, Ctrl-C and SIGTERM leave no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catalog_embed.pipelines.cli import main
from tests.helpers.faults import as_a_shell_starts_it, kill_session, staged_embedding_parts, wait_for
from tests.helpers.probe_fixtures import embeddings_rows, labels_for, latent, write_embeddings

MODEL = "mfcc-stats"
ROOT = Path(__file__).resolve().parents[2]  # this checkout: scripts run here import `tests.*`


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own checks end the process
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("catalog-embed: error: "), err
    return err


def _python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def probe_tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    z = latent(120)
    write_embeddings(root / "tables" / "embeddings", embeddings_rows(z, dim=8))
    pq.write_table(labels_for("multiclass", z), root / "labels.parquet")
    argv = ["probe", "--embeddings", str(root / "tables" / "embeddings"), "--labels", str(root / "labels.parquet"),
            "--task", "g", "--kind", "multiclass", "--max-epochs", "2", "--out", str(root / "probe")]
    assert main(argv) == 0
    return root


def test_output_folder_that_is_a_file(small_catalog, probe_tables, tmp_path, capsys):
    a_file = tmp_path / "tables"
    a_file.write_text("not a folder")
    err = _one_line_error(capsys, ["embed", "--catalog", str(small_catalog.manifest_path), "--out", str(a_file)])
    assert "is a file, not a folder" in err
    err = _one_line_error(
        capsys,
        ["tag", "--probe", str(probe_tables / "probe"), "--embeddings", str(probe_tables / "tables" / "embeddings"),
         "--out", str(a_file / "predictions")],
    )
    assert "--out" in err and "is a file" in err


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    if not os.access("/proc/sys", os.W_OK):  # root writes anywhere but on a read-only mount
        return Path("/proc/sys")
    pytest.skip("no folder here is read-only for this user")


def test_output_folder_that_cannot_be_written(small_catalog, tmp_path, capsys):
    out = _read_only_folder(tmp_path) / "tables"
    err = _one_line_error(capsys, ["embed", "--catalog", str(small_catalog.manifest_path), "--out", str(out)])
    assert "cannot be written" in err and "pass a writable folder" in err


def test_tag_options_and_errors_name_what_tag_has(probe_tables, tmp_path, capsys):
    tag = ["tag", "--probe", str(probe_tables / "probe"), "--out", str(tmp_path / "pred")]
    embeddings = str(probe_tables / "tables" / "embeddings")
    err = _one_line_error(capsys, [*tag, "--embeddings", embeddings, "--batch-rows", "0"])
    assert "--batch-rows must be at least 1, got 0" in err
    other = write_embeddings(tmp_path / "other", embeddings_rows(latent(10), model="other-model", dim=8))
    err = _one_line_error(capsys, [*tag, "--embeddings", other])
    # `tag` has no --model: the fix is another table (or another probe).
    assert "--model" not in err and "model 'toy' has no live rows" in err and "probe" in err


def test_vacuum_retention_below_the_delta_minimum(tmp_path, capsys):
    err = _one_line_error(capsys, ["vacuum", "--out", str(tmp_path), "--retention-hours", "0"])
    assert "pass 168 or more" in err


def test_a_command_line_mistake_is_one_line(capsys):
    err = _one_line_error(capsys, ["query", "--out"])
    assert "catalog-embed query --help" in err


def test_device_errors_echo_the_device_typed(small_catalog, tmp_path, capsys):
    argv = ["plan", "--catalog", str(small_catalog.manifest_path), "--out", str(tmp_path / "t"), "--model", MODEL]
    err = _one_line_error(capsys, [*argv, "--device", "cuda:7"])
    assert "'cuda:7'" in err


@pytest.mark.parametrize(
    ("module", "argv", "extra"),
    [
        ("sklearn", ["probe", "--embeddings", "{tables}", "--labels", "{labels}", "--task", "g", "--kind",
                     "multiclass", "--out", "{out}"], "probe"),
        ("apache_beam", ["embed", "--catalog", "{catalog}", "--out", "{out}", "--model", MODEL, "--runner", "beam"],
         "beam"),
        ("ray", ["embed", "--catalog", "{catalog}", "--out", "{out}", "--model", MODEL, "--runner", "ray"], "ray"),
    ],
)
def test_a_missing_extra_is_named(small_catalog, probe_tables, tmp_path, module, argv, extra):
    values = {"tables": str(probe_tables / "tables" / "embeddings"), "labels": str(probe_tables / "labels.parquet"),
              "catalog": str(small_catalog.manifest_path), "out": str(tmp_path / "out")}
    code = f"""
        import sys
        sys.modules[{module!r}] = None  # as if the extra were not installed
        from catalog_embed.pipelines.cli import main
        sys.exit(main(sys.argv[1:]))
    """
    done = _python(code, *(a.format(**values) for a in argv))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("catalog-embed: error: ")
    assert f"pip install 'catalog-embed[{extra}]'" in done.stderr


def test_an_unfinished_delta_scan_does_not_crash_the_exit(tmp_path):
    # Arrow's I/O threads still reading through deltalake's Python filesystem when the interpreter finalized made
    # `plan` and `tag` end with "terminate called without an active exception" (134), a segfault or a hang after
    # they had succeeded; a scan left open makes it happen every time.
    rows = embeddings_rows(latent(60), dim=8)
    uri = write_embeddings(tmp_path / "embeddings", *[rows.slice(i, 1) for i in range(60)])
    code = """
        import sys
        from catalog_embed.pipelines.probes.tables import EmbeddingsSource
        from catalog_embed.pipelines.io.store import TableStore
        from catalog_embed.schemas.tables import EMBEDDINGS
        probe_scan = EmbeddingsSource(sys.argv[1]).batches(1)  # as `probe` and `tag` read
        table_scan = TableStore(sys.argv[2]).scan(EMBEDDINGS).to_batches(batch_size=1)  # as `plan` and `query`
        print(len(next(probe_scan).track_ids) + next(table_scan).num_rows)
    """
    done = _python(code, uri, str(tmp_path), timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "2"), done.stderr[-2000:]
    assert "terminate called" not in done.stderr


@pytest.mark.parametrize(("sent", "code", "blocked"), [
    (signal.SIGINT, 130, False),
    (signal.SIGTERM, 143, False),
    # Started with both signals blocked, as Ray starts its processes (their children inherit the mask).
    (signal.SIGINT, 130, True),
])  # fmt: skip
def test_interrupted_run_stops_cleanly(small_catalog, small_labels, tmp_path, sent, code, blocked):
    good = [la["track_id"] for la in small_labels if la["broken"] is None]
    hang = next(Path(u).name for t, u in zip(*_manifest(small_catalog), strict=True) if t == good[-1])
    out = str(tmp_path / "tables")
    command = [sys.executable, "-m", "catalog_embed.pipelines.cli", "embed", "--catalog", str(small_catalog.manifest_path),
               "--out", out, "--model", MODEL, "--workers", "2", "--shard-size", "1", "--decode-timeout", "600"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), CATALOG_EMBED_FAILPOINTS=f"decode=hang:{hang}")

    def start() -> None:
        as_a_shell_starts_it()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    proc = subprocess.Popen(
        command, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=start,
    )
    try:
        wait_for(lambda: staged_embedding_parts(out) >= 1, proc, "the first staged shard")
        # As a terminal's Ctrl-C or a service manager's stop: the signal reaches every process of the group.
        os.killpg(proc.pid, sent)
        output, _ = proc.communicate(timeout=120)
    finally:
        kill_session(proc)
    assert proc.returncode == code, output[-3000:]
    assert "Traceback" not in output, output
    assert output.strip().splitlines()[-1] == "catalog-embed: interrupted; run again to resume"


def _manifest(catalog) -> tuple[list[str], list[str]]:
    table = pq.read_table(catalog.manifest_path)
    return table["track_id"].to_pylist(), table["uri"].to_pylist()
