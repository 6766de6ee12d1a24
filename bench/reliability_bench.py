"""Reliability report: a large catalog with hostile files, a decode worker and then the driver killed mid-run.

1. Renders a demo catalog (default 1,000 tracks) whose broken rows cover every broken kind (truncated, empty, not
   audio, corrupt header, missing), and marks further good tracks, spread over the catalog, whose decoder will
   segfault or hang (injected at the decoder, as `catalog_embed.workers.failpoints` documents): 50 hostile rows by
   default. Three hostile media files join them:
   an HLS playlist pointing at a file outside the catalog, an ffconcat list and an SDP session description (a
   decoder that followed them would embed the outside file or block on a socket).
2. Starts `catalog-embed embed` in a process of its own; once a third of the shards are staged it runs
   `vacuum --staging-hours 0` (the live run's staging must survive) and a second embed run on another catalog into
   the same tables (it must not adopt the live run), then kill -9s one decode worker; once two thirds are staged it
   kill -9s the driver.
3. Runs the same command again, which resumes the interrupted run, and checks the tables.
4. Four cases of their own, each on a few of the catalog's tracks in tables of its own: a commit stalled past its
   lease while a rerun comes (never adopted while alive; nothing lost once it is killed and resumed), a manifest
   edited in place under a killed run (the resume commits what the catalog says now), damaged tables (every command
   one line, exit 2, not a byte changed) and hostile `similar --where` fragments (refused, nothing written or leaked).

Prints a table (job failures, rows, duplicates, lost tracks, the time a hang costs, each case's invariants, and
whether every invariant held) and writes bench/results/reliability.json.

    python bench/reliability_bench.py [--tracks 1000] [--hostile 50] [--duration 4] [--timeout 10] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from harness import BenchRun, console, parse_args, print_table, results_path
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.cli import main as cli_main
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.vacuum import vacuum
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.schemas.errors import CatalogEmbedError
from catalog_embed.schemas.records import WorkItem
from catalog_embed.schemas.tables import EMBEDDINGS
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.failpoints import ENV as FAILPOINTS
from catalog_embed.workers.isolation import IsolatedPool
from catalog_embed.workers.stages import DecodeStage, EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
# One crasher and one hanger; the hang holds the first run half way for `timeout` seconds, longer than the other
# catalog's run takes on a busy machine. Short tracks: starting processes costs more than embedding them.
SMOKE = {"tracks": 24, "hostile": 10, "duration": 1.5, "timeout": 30.0, "shard_size": 2}


def _embed(
    catalog: str, out: str, timeout: float, shard_size: int, failpoints: str, *extra: str, **env_vars: str
) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{FAILPOINTS: failpoints}, **env_vars)
    command = [
        sys.executable, "-m", "catalog_embed.pipelines.cli", "embed", "--catalog", catalog, "--out", out,
        "--decode-timeout", str(timeout), "--shard-size", str(shard_size), "--workers", "2", *extra,
    ]
    return subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (the decode workers of a local run), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _wait_for_shards(out: str, count: int, proc: subprocess.Popen, limit_s: float = 1800) -> None:
    store = TableStore(out)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        runs = store.staged_runs() if Path(out, "_staging").exists() else []
        if runs and len(store.staged_parts(runs[-1], EMBEDDINGS)) >= count:
            return
        time.sleep(0.2)
    msg = f"the run staged fewer than {count} shards (exit {proc.poll()})"
    raise RuntimeError(msg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=1000)
    parser.add_argument("--hostile", type=int, default=50)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--shard-size", type=int, default=25)
    args = parse_args(parser, SMOKE)
    run = BenchRun("reliability", args)
    work = Path(tempfile.mkdtemp(prefix="reliability-"))
    n_injected = min(args.hostile // 5, args.tracks)  # crashers and hangers, half each
    n_broken = args.hostile - n_injected
    console.print(f"rendering {args.tracks} tracks ({n_broken} broken files) in {work} ...")
    started = time.perf_counter()
    catalog = render_demo_catalog(
        work / "catalog",
        DemoCatalogConfig(n_tracks=args.tracks, duration_s=args.duration, n_broken=n_broken, seed=11),
        workers=2,
    )
    render_s = time.perf_counter() - started
    labels = pq.read_table(catalog.labels_path).to_pylist()
    good = sorted(la["track_id"] for la in labels if la["broken"] is None)
    # Spread over the catalog, crashers and hangers in turn: the local runner keeps shards in order, so each hang
    # holds the run at its place for `timeout` seconds and the run is still live when its worker and it are killed,
    # even in a small catalog.
    injected = good[:: max(1, len(good) // max(1, n_injected))][:n_injected]
    crashers, hangers = injected[0::2], injected[1::2]
    expected_bad = sorted({la["track_id"] for la in labels if la["broken"]} | set(crashers) | set(hangers))
    expected_good = sorted(set(good) - set(crashers) - set(hangers))
    failpoints = ";".join([f"decode=segfault:{t}." for t in crashers] + [f"decode=hang:{t}." for t in hangers])
    hostile_media = _add_hostile_media(catalog.root, catalog.manifest_path, good[-1])
    expected_bad = sorted(set(expected_bad) | set(hostile_media))
    out = str(work / "tables")
    manifest = str(catalog.manifest_path)
    n_shards = -(-args.tracks // args.shard_size)

    console.print("run 1: killing a decode worker, then the driver ...")
    first = _embed(manifest, out, args.timeout, args.shard_size, failpoints)
    _wait_for_shards(out, n_shards // 3, first)
    live = TableStore(out).staged_runs()
    swept = vacuum(out, staging_hours=0, retention_hours=168, dry_run=False)
    # Another catalog (20 good tracks, fewer in a small catalog so that the first run outlasts it, listed in a second
    # manifest) into the same tables, meanwhile.
    other_ids = pa.array(expected_good[: max(1, min(20, len(expected_good) // 10))])
    other_manifest = str(catalog.root / "manifest-other.parquet")
    pq.write_table(pq.read_table(manifest).filter(pc.is_in(pc.field("track_id"), other_ids)), other_manifest)
    other = run_embed(EmbedConfig(catalog=other_manifest, out=out, decode_timeout_s=args.timeout), Console(quiet=True))
    workers = _children(first.pid)
    if not workers:
        msg = f"the first run ended (exit {first.poll()}) before a decode worker could be killed: ask for more --tracks"
        raise RuntimeError(msg)
    os.kill(workers[0], signal.SIGKILL)
    _wait_for_shards(out, 2 * n_shards // 3, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    console.print("run 2: resuming ...")
    started = time.perf_counter()
    second = _embed(manifest, out, args.timeout, args.shard_size, failpoints)
    log = second.communicate()[0]
    resume_s = time.perf_counter() - started
    resumed = "resuming run" in log

    con = connect(out)
    embedded = [r[0] for r in con.execute("SELECT track_id FROM embeddings WHERE NOT deleted").fetchall()]
    failed = dict(con.execute("SELECT track_id, error_type FROM failures").fetchall())
    n_failed_rows = con.execute("SELECT count(*) FROM failures").fetchone()[0]
    runs = con.execute("SELECT status, n_embedded, n_failed FROM runs").fetchall()
    timeouts = [t for t in hangers if failed.get(t) == "DecodeTimeout"]
    report = {
        "tracks": args.tracks,
        "hostile": len(expected_bad),
        "job_failures": int(second.returncode != 0) + sum(status != "succeeded" for status, *_ in runs),
        "embeddings_rows": len(embedded),
        "expected_good": len(expected_good),
        "failures_rows": n_failed_rows,
        "expected_bad": len(expected_bad),
        "duplicates": (len(embedded) - len(set(embedded))) + (n_failed_rows - len(failed)),
        "lost": len(set(expected_good) - set(embedded)) + len(set(expected_bad) - set(failed)),
        "good_tracks_failed": len(set(expected_good) & set(failed)),
        "hangs_timed_out": f"{len(timeouts)}/{len(hangers)}",
        "crashes_recorded": sum(failed.get(t) == "DecoderCrashed" for t in crashers),
        "hostile media refused": f"{sum(failed.get(t) == 'AudioDecodeError' for t in hostile_media)}/{len(hostile_media)}",
        "resumed": resumed,
        "live staging removed by vacuum": len(set(swept.staging_removed) & set(live)),
        "live run adopted by another catalog's run": int(other.run_id in live),
        "other catalog's tracks embedded": f"{other.stats.n_embedded}/{len(other_ids)}",
        "render_s": round(render_s, 1),
        "resume_run_s": round(resume_s, 1),
    }
    report["hang_cost_s"] = round(_hang_cost(catalog.root, hangers[0], args.timeout), 2) if hangers else 0.0
    invariants = {
        "job_failures": 0, "embeddings_rows": report["expected_good"], "failures_rows": report["expected_bad"],
        "duplicates": 0, "lost": 0, "good_tracks_failed": 0,
        "live staging removed by vacuum": 0, "live run adopted by another catalog's run": 0,
    }
    rows = pq.read_table(manifest)
    few = rows.filter(pc.is_in(rows["track_id"], pa.array(expected_good[:4])))
    for case in (_stalled_commit, _edited_catalog, _damaged_tables, _hostile_where):
        console.print(f"case: {case.__doc__.splitlines()[0]}")
        for key, (value, target) in case(catalog.root, few, work, args.timeout).items():
            report[key], invariants[key] = value, target
    report["every invariant held"] = all(report[key] == target for key, target in invariants.items())
    targets = invariants | {"hang_cost_s": f"its timeout, {args.timeout:g}", "every invariant held": True}
    print_table(
        "reliability: kill a decode worker, kill -9 the driver, resume",
        ("measure", "value", "target"),
        ((key, str(value), str(targets.get(key, ""))) for key, value in report.items()),
    )
    console.print(f"wrote {run.write(results_path('reliability'), report)}")


Invariants = dict[str, tuple[object, object]]  # measure -> (value, the value it must have)


def _embedded(out: str) -> list[tuple[str, str]]:
    """(track_id, source_uri) of every live embedding row, sorted (empty before the first commit)."""
    try:
        return sorted(connect(out).execute("SELECT track_id, source_uri FROM embeddings WHERE NOT deleted").fetchall())
    except CatalogEmbedError:  # no tables yet: the run has not prepared them
        return []


def _wait(condition, proc: subprocess.Popen, what: str, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            msg = f"{what} did not happen (exit {proc.poll()})"
            raise RuntimeError(msg)
        time.sleep(0.2)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _cli(*argv: str) -> tuple[int, str, str]:
    """`catalog-embed argv...` in this process (a process each would cost its start-up many times over): its exit
    code, stdout and stderr. RUST_BACKTRACE is set, as on many machines: no backtrace may reach the output."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, RUST_BACKTRACE="1"), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _one_line_exit_2(done: tuple[int, str, str]) -> bool:
    code, _, err = done
    return code == 2 and err.count("\n") == 1 and err.startswith("catalog-embed: error:")


def _stalled_commit(root: Path, tracks: pa.Table, work: Path, timeout: float) -> Invariants:
    """a commit stalled past its lease, a rerun meanwhile, then the stalled run killed and resumed.

    The run commits its rows and hangs before its runs row (failpoint) with a 2 s lease; once that lease would have
    expired, the catalog gains a track and a rerun comes: it must not adopt the live run, and must embed the new
    track. Then the stalled run is killed and the next run resumes it: every track once, both runs recorded.
    """
    manifest, out = str(root / "manifest-stalled.parquet"), str(work / "stalled")
    pq.write_table(tracks.slice(0, 2), manifest)
    stalled = _embed(manifest, out, timeout, 25, "commit.runs=hang", "--model", "mfcc-stats",
                     CATALOG_EMBED_LEASE_TTL_S="2")
    _wait(lambda: len(_embedded(out)) == 2, stalled, "the stalled run's rows committed")
    time.sleep(4)  # past the 2 s lease: a live run that stopped heartbeating would now count as dead
    pq.write_table(tracks.slice(0, 3), manifest)
    config = EmbedConfig(catalog=manifest, out=out, encoder=EncoderConfig(model="mfcc-stats"),
                         decode_timeout_s=timeout)
    rerun = run_embed(config, Console(quiet=True))
    stalled_id = next(name for name in TableStore(out).staged_runs() if name != rerun.run_id)
    _kill(stalled)
    resumed = run_embed(config, Console(quiet=True))
    rows = _embedded(out)
    runs = sorted(r[0] for r in connect(out).execute("SELECT run_id FROM runs").fetchall())
    return {
        "stalled commit adopted while alive": (int(rerun.run_id == stalled_id), 0),
        "stalled commit: tracks embedded once": (len({t for t, _ in rows}), 3),
        "stalled commit: duplicate rows": (len(rows) - len({t for t, _ in rows}), 0),
        "stalled commit: killed run resumed and recorded": (resumed.run_id == stalled_id and stalled_id in runs, True),
    }


def _edited_catalog(root: Path, tracks: pa.Table, work: Path, timeout: float) -> Invariants:
    """a manifest edited in place under a killed run: one track taken down, one pointed at another file.

    The run stages the shard of a and b, hangs on c and is killed; the manifest then drops a and points b at d's file.
    The resume must commit what the catalog says now: no row for a, b from its new file, every track once.
    """
    manifest, out = str(root / "manifest-edited.parquet"), str(work / "edited")
    pq.write_table(tracks, manifest)
    a, b, c, _ = tracks["track_id"].to_pylist()
    killed = _embed(manifest, out, timeout, 2, f"decode=hang:{c}.", "--model", "mfcc-stats")
    _wait(lambda: Path(out, "_staging").exists() and any(
        TableStore(out).staged_parts(run, EMBEDDINGS) for run in TableStore(out).staged_runs()), killed,
        "the first shard staged")
    _kill(killed)
    (killed_id,) = TableStore(out).staged_runs()
    uris = tracks["uri"].to_pylist()
    edited = [{"track_id": t, "uri": uris[3] if t == b else u} for t, u in zip(tracks["track_id"].to_pylist(), uris,
                                                                              strict=True) if t != a]
    pq.write_table(pa.Table.from_pylist(edited), manifest)
    config = EmbedConfig(catalog=manifest, out=out, encoder=EncoderConfig(model="mfcc-stats"),
                         decode_timeout_s=timeout)
    resumed = run_embed(config, Console(quiet=True))
    rows = dict(_embedded(out))
    return {
        "edited catalog: the killed run resumed": (resumed.run_id == killed_id, True),
        "edited catalog: taken-down track live": (int(a in rows), 0),
        "edited catalog: re-pointed track from its new file": (rows.get(b, "").endswith(Path(uris[3]).name), True),
        "edited catalog: live rows": (len(rows), 3),
    }


def _damaged_tables(root: Path, tracks: pa.Table, work: Path, timeout: float) -> Invariants:
    """damaged tables: a garbage commit, a missing commit, a truncated and a deleted part file.

    For each damage, `query`, `similar`, `index`, `plan`, `embed` and `vacuum` must each print one line and exit 2,
    and leave every byte of the tables as it was (sha256 of every file before and after).
    """
    manifest = str(root / "manifest-damaged.parquet")
    pq.write_table(tracks, manifest)
    clean = work / "damaged-clean"
    run_embed(EmbedConfig(catalog=manifest, out=str(clean), encoder=EncoderConfig(model="mfcc-stats"),
                          decode_timeout_s=timeout), Console(quiet=True))
    table = "embeddings"

    def last_commit(out: Path) -> Path:
        return sorted((out / table / "_delta_log").glob("*.json"))[-1]

    def a_part(out: Path) -> Path:
        return next((out / table).rglob("*.parquet"))

    damages = {
        "garbage commit": lambda out: last_commit(out).write_text("not json"),
        # The first: without the newest commit a table is its previous version, indistinguishable from a real one.
        "deleted commit": lambda out: sorted((out / table / "_delta_log").glob("*.json"))[0].unlink(),
        "truncated part": lambda out: a_part(out).write_bytes(a_part(out).read_bytes()[:100]),
        "deleted part": lambda out: a_part(out).unlink(),
    }
    one_line = commands = changed = 0
    for name, damage in damages.items():
        out = work / f"damaged-{name.replace(' ', '-')}"
        shutil.copytree(clean, out)
        damage(out)
        before = _digests(out)
        for argv in (
            ("query", "--out", str(out), "SELECT count(*) FROM embeddings"),
            ("similar", "--out", str(out), "--track", tracks["track_id"][0].as_py()),
            ("index", "--out", str(out)),
            ("plan", "--catalog", manifest, "--out", str(out), "--model", "mfcc-stats"),
            ("embed", "--catalog", manifest, "--out", str(out), "--model", "mfcc-stats"),
            ("vacuum", "--out", str(out)),
        ):
            commands += 1
            one_line += _one_line_exit_2(_cli(*argv))
        changed += int(_digests(out) != before)
    return {
        "damaged tables: commands answering one line, exit 2": (f"{one_line}/{commands}", f"{commands}/{commands}"),
        "damaged tables: tables changed by a command": (changed, 0),
    }


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hostile_where(root: Path, tracks: pa.Table, work: Path, timeout: float) -> Invariants:
    """hostile `similar --where` fragments: a second statement, COPY TO, ATTACH, reading a file outside.

    Each must be refused in one line (exit 2): no file written, no database created, no line of the outside file in
    the output.
    """
    manifest, out = str(root / "manifest-where.parquet"), str(work / "where")
    pq.write_table(tracks, manifest)
    run_embed(EmbedConfig(catalog=manifest, out=out, encoder=EncoderConfig(model="mfcc-stats"),
                          decode_timeout_s=timeout), Console(quiet=True))
    secret = work / "secret.csv"
    secret.write_text("token\nDO-NOT-LEAK-7a1f\n")
    written = work / "pwned.csv"
    attached = work / "pwned.duckdb"
    fragments = (
        f"1=1; COPY (SELECT 'x' AS x) TO '{written}'; SELECT 1 WHERE 1=1",
        f"1=1; ATTACH '{attached}' AS pwned",
        f"track_id IN (SELECT token FROM read_csv('{secret}'))",
        f"(SELECT count(*) FROM read_csv('{secret}')) > 0",
        "1=1 UNION SELECT * FROM duckdb_settings()",
    )
    refused = leaked = 0
    for fragment in fragments:
        done = _cli("similar", "--out", out, "--track", tracks["track_id"][0].as_py(), "--where", fragment)
        refused += _one_line_exit_2(done)
        leaked += "DO-NOT-LEAK" in done[1] + done[2]
    return {
        "--where: hostile fragments refused in one line": (f"{refused}/{len(fragments)}",
                                                           f"{len(fragments)}/{len(fragments)}"),
        "--where: files written or attached": (int(written.exists()) + int(attached.exists()), 0),
        "--where: outside file leaked": (leaked, 0),
    }


def _add_hostile_media(root: Path, manifest: Path, outside_of: str) -> list[str]:
    """Write files that make FFmpeg reach beyond their bytes into the catalog and list them in the manifest."""
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.mp3"
    secret.write_bytes(next((root / "audio").glob(f"{outside_of}.*")).read_bytes())
    files = {
        "hostile-hls": ("playlist.m3u8", f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\n{secret}\n#EXT-X-ENDLIST\n"),
        "hostile-concat": ("list.flac", f"ffconcat version 1.0\nfile '{secret}'\n"),
        "hostile-sdp": (
            "session.wav",
            "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 9 RTP/AVP 0\na=rtpmap:0 PCMU/8000\n",
        ),
    }
    rows = pq.read_table(manifest)
    extra = []
    for track_id, (name, text) in files.items():
        (root / "audio" / name).write_text(text)
        extra.append({"track_id": track_id, "uri": str(root / "audio" / name)})
    rows = rows.select(["track_id", "uri"])
    pq.write_table(pa.concat_tables([rows, pa.Table.from_pylist(extra).cast(rows.schema)]), manifest)
    return sorted(files)


def _hang_cost(root: Path, track_id: str, timeout: float) -> float:
    """Seconds a hanging file holds a decode child before it is killed and its track fails."""
    os.environ[FAILPOINTS] = f"decode=hang:{track_id}."
    uri = next(str(p) for p in (root / "audio").iterdir() if p.name.startswith(f"{track_id}."))
    with IsolatedPool(DecodeStage(EncoderConfig()), 1, timeout, 4096) as pool:
        [(_failure, seconds)] = list(pool.imap([WorkItem(track_id, uri, "bench")], ahead=1))
    return seconds


if __name__ == "__main__":
    main()
