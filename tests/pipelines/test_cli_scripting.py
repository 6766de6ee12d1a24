"""What a scheduler relies on: `--version`, `embed --json`, exit codes that say whether to retry, `--config`
files read through the flags' declarations, and JSON logs on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import pytest

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.cli import main
from catalog_embed.pipelines.embed.config import OPTIONS
from tests.helpers.cli import run_cli
from tests.helpers.faults import ROOT, expected_tracks

MODEL = "mfcc-stats"


def _config_file(folder: Path, text: str) -> str:
    path = folder / "nightly.toml"
    path.write_text(text)
    return str(path)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"catalog-embed {version('catalog-embed')}"


class Nightly(NamedTuple):
    """A finished `embed` process: its exit code, stdout, stderr and output root."""

    code: int
    stdout: str
    stderr: str
    out: str


@pytest.fixture(scope="module")
def nightly(small_catalog, tmp_path_factory) -> Nightly:
    """One run as a scheduler starts it: a config file plus a flag overriding one of its values, a JSON result and
    JSON logs."""
    folder = tmp_path_factory.mktemp("nightly")
    out = str(folder / "tables")
    config = _config_file(folder, "\n".join([
        f'catalog = "{small_catalog.manifest_path}"', f'out = "{out}"', f'model = "{MODEL}"', "shard-size = 3",
        "max-duration = 600", "workers = 1", "windows = true",
    ]))
    command = [sys.executable, "-m", "catalog_embed.pipelines.cli", "--log-format", "json",
               "embed", "--config", config, "--shard-size", "5", "--json"]
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True,
                          check=False, text=True, timeout=600)
    return Nightly(done.returncode, done.stdout, done.stderr, out)


def test_embed_json_is_one_document_with_the_run_and_its_counts(nightly, small_labels):
    assert nightly.code == 0, nightly.stderr[-3000:]
    assert nightly.stdout.count("\n") == 1
    result = json.loads(nightly.stdout)
    good, bad = expected_tracks(small_labels)
    (run_id, n_embedded, n_failed), = connect(nightly.out).execute(
        "SELECT run_id, n_embedded, n_failed FROM runs WHERE status = 'succeeded'").fetchall()
    assert (result["run_id"], result["status"], result["model"]) == (run_id, "succeeded", MODEL)
    assert result["counts"] == {"embedded": len(good), "failed": len(bad), "skipped": 0, "refused": 0, "deleted": 0}
    assert (n_embedded, n_failed) == (len(good), len(bad))
    assert result["audio_hours"] > 0 and result["x_real_time"] > 0 and result["wall_seconds"] > 0
    assert result["model_version"] and result["tables"]["embeddings"] == f"{nightly.out}/embeddings"
    assert sorted(result["tables"]) == ["embeddings", "failures", "runs", "windows"]


def test_a_flag_overrides_the_config_file_and_the_runs_row_holds_the_resolved_config(nightly):
    assert nightly.code == 0, nightly.stderr[-3000:]
    (saved,), = connect(nightly.out).execute("SELECT config_json FROM runs").fetchall()
    config = json.loads(saved)
    assert config["shard_size"] == 5  # the flag, over the file's 3
    assert (config["workers"], config["decode"]["max_duration_s"], config["write_windows"]) == (1, 600.0, True)
    assert config["encoder"]["model"] == MODEL


def test_json_logs_are_one_object_per_line_tagged_with_the_run(nightly):
    assert nightly.code == 0, nightly.stderr[-3000:]
    records = [json.loads(line) for line in nightly.stderr.splitlines()]
    run_id = json.loads(nightly.stdout)["run_id"]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    ours = [r for r in records if r["logger"] == "catalog_embed.pipelines.embed.job"]
    assert ours[0]["message"].startswith(f"run {run_id}: {MODEL}")
    assert any(r["message"].startswith("succeeded: ") for r in ours)  # the summary for people, as records
    assert all(r["run_id"] == run_id and r["level"] == "info" for r in ours)


def test_the_log_level_silences_the_summary_for_people(nightly, capsys):
    assert nightly.code == 0, nightly.stderr[-3000:]
    code, _, err = run_cli(capsys, "--log-level", "warning", *_rerun(nightly))
    assert (code, err) == (0, "")
    code, _, err = run_cli(capsys, *_rerun(nightly))
    assert code == 0 and "succeeded: 0 embedded, 0 failed" in err


def _rerun(nightly: Nightly) -> list[str]:
    """`embed` of the nightly run's catalog and settings again: nothing left to do."""
    (saved,), = connect(nightly.out).execute("SELECT config_json FROM runs LIMIT 1").fetchall()
    config = json.loads(saved)
    return ["embed", "--catalog", config["catalog"], "--out", nightly.out, "--model", MODEL, "--windows",
            "--max-duration", "600"]


def test_a_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["embed", "--catalog", "c", "--out", "o", "--workers", "two"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("catalog-embed: error: ") and "--workers" in err


def test_a_run_aborted_as_broken_exits_1(tmp_path, capsys):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for i in range(24):  # above the 20 tracks a failure ratio is judged on, none of them audio
        (catalog / f"t{i:02d}.mp3").write_text("not audio")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "embed", "--catalog", str(catalog), "--out", str(out), "--model", MODEL,
                                "--workers", "1", "--json")
    assert code == 1, err
    assert stdout == ""
    assert err.strip().splitlines()[-1].startswith("catalog-embed: error: 24 of 24 tracks failed")
    assert connect(str(out)).execute("SELECT status FROM runs").fetchall() == [("aborted",)]


def test_an_unknown_config_key_fails_before_any_work(small_catalog, tmp_path, capsys):
    out = tmp_path / "out"
    config = _config_file(tmp_path, f'catalog = "{small_catalog.manifest_path}"\nworker = 4\nmax_duration = 60\n')
    code, _, err = run_cli(capsys, "embed", "--config", config, "--out", str(out))
    assert code == 2
    assert err.count("\n") == 1
    assert "unknown keys max_duration, worker; valid keys (the flags' names): catalog, out, model" in err
    assert all(option.flag.removeprefix("--") in err for option in OPTIONS)
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('workers = "4"', "workers = '4' must be an integer, as --workers takes"),
        ("max-duration = true", "max-duration = True must be a number"),
        ('precision = "fp64"', "precision = 'fp64' must be one of fp32, bf16, fp16"),
        ('windows = "yes"', "windows = 'yes' must be true or false"),
        ('allow-prefix = "/x"', "allow-prefix = '/x' must be a list of strings"),
        ("workers = [", "is not valid TOML"),
    ],
)
def test_config_values_are_checked_like_the_flags(small_catalog, tmp_path, capsys, line, message):
    config = _config_file(tmp_path, f"{line}\n")
    code, _, err = run_cli(capsys, "plan", "--config", config, "--catalog", str(small_catalog.manifest_path),
                           "--out", str(tmp_path / "out"))
    assert code == 2
    assert message in err and err.startswith("catalog-embed: error: --config ")


def test_catalog_and_out_may_come_from_the_config_but_must_come_from_somewhere(tmp_path, capsys):
    config = _config_file(tmp_path, f'out = "{tmp_path / "out"}"\n')
    code, _, err = run_cli(capsys, "plan", "--config", config)
    assert code == 2
    assert "--catalog is required: pass it, or set catalog in the --config file" in err


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", "--config", str(tmp_path / "absent.toml"))
    assert code == 2
    assert err.count("\n") == 1 and "absent.toml cannot be read (No such file or directory)" in err
