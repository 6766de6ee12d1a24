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

Prints a table (job failures, rows, duplicates, lost tracks, the time a hang costs) and writes
bench/results/reliability.json.

    python bench/reliability_bench.py [--tracks 1000] [--hostile 50] [--duration 4] [--timeout 10] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from harness import BenchRun, console, parse_args, print_table, results_path
from rich.console import Console

from catalog_embed.pipelines.analysts.query import connect
from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.embed.vacuum import vacuum
from catalog_embed.pipelines.io.store import TableStore
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


def _embed(catalog: str, out: str, timeout: float, shard_size: int, failpoints: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{FAILPOINTS: failpoints})
    command = [
        sys.executable, "-m", "catalog_embed.pipelines.cli", "embed", "--catalog", catalog, "--out", out,
        "--decode-timeout", str(timeout), "--shard-size", str(shard_size), "--workers", "2",
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
    targets = {
        "job_failures": 0, "embeddings_rows": report["expected_good"], "failures_rows": report["expected_bad"],
        "duplicates": 0, "lost": 0, "good_tracks_failed": 0, "hang_cost_s": f"its timeout, {args.timeout:g}",
        "live staging removed by vacuum": 0, "live run adopted by another catalog's run": 0,
    }
    print_table(
        "reliability: kill a decode worker, kill -9 the driver, resume",
        ("measure", "value", "target"),
        ((key, str(value), str(targets.get(key, ""))) for key, value in report.items()),
    )
    console.print(f"wrote {run.write(results_path('reliability'), report)}")


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
