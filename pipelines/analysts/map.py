"""`catalog-embed map`: a 2-D picture of one model's embedding space, coloured by a label column.

Up to `--max-tracks` live tracks (a seeded sample) are projected with UMAP where umap-learn is installed and PCA
(scikit-learn) otherwise, both seeded. The PNG has a legend and a title naming the model, layer, projection and
track count; the HTML file is one self-contained page (an inline SVG, no script, no external link) whose points
show their track id and label on hover.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_embed.pipelines.analysts.outputs import OutputFile
from catalog_embed.pipelines.analysts.vectors import ModelLayer, Vectors, add_table_arguments, store_from_args
from catalog_embed.schemas.errors import ConfigError, LabelsError

# Categories drawn in their own colour; the rest are grouped as "other" so the legend stays readable.
MAX_CATEGORIES = 12
_SVG_SIZE = 720


@dataclass(frozen=True)
class Projection:
    """Projected tracks: ids, 2-D points, the label per track (None without labels) and how they were made."""

    track_ids: np.ndarray
    points: np.ndarray
    labels: np.ndarray | None
    numeric: bool
    method: str


def project(vectors: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of `vectors`: UMAP (when asked or, with "auto", installed) else PCA."""
    if method == "umap" or (method == "auto" and importlib.util.find_spec("umap") is not None):
        if importlib.util.find_spec("umap") is None:
            msg = "--method umap needs umap-learn: pip install umap-learn, or use --method pca"
            raise ConfigError(msg)
        import umap

        neighbours = min(15, len(vectors) - 1)
        return umap.UMAP(n_neighbors=neighbours, metric="cosine", random_state=seed).fit_transform(vectors), "UMAP"
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(vectors), "PCA"


def label_column(labels_path: str, column: str, track_ids: pa.Array) -> tuple[np.ndarray, bool]:
    """The values of `column` per track (None where unlabelled) and whether they are numeric.

    Raises:
        LabelsError: the column is missing, or no labelled track is among the mapped ones.
    """
    from catalog_embed.pipelines.probes.tables import (
        read_labels,  # pulls scikit-learn and mir_eval: only when labels are asked for
    )

    labels = read_labels(labels_path)
    if column not in labels.column_names:
        msg = f"--color-by {column!r} is not a column of {labels_path} (columns: {', '.join(labels.column_names)})"
        raise LabelsError(msg)
    ids = pc.cast(labels["track_id"], pa.string())
    rows = pc.index_in(track_ids, value_set=ids)
    if pc.all(pc.is_null(rows)).as_py():
        msg = (
            f"none of the track ids in {labels_path} (e.g. {ids.slice(0, 2).to_pylist()}) is an embedded track "
            f"(e.g. {track_ids.slice(0, 2).to_pylist()}): the labels' track_id must use the catalog's ids"
        )
        raise LabelsError(msg)
    values = labels[column].take(rows)
    numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
    return np.asarray(values.to_pylist(), dtype=object), numeric


def build_projection(source: ModelLayer, max_tracks: int, method: str, seed: int,
                     labels: str | None, color_by: str | None) -> Projection:
    """Sample, read, label and project (labels are checked before any vector is read)."""
    ids = source.keys()["track_id"]
    rng = np.random.default_rng(seed)
    picked = ids.take(np.sort(rng.permutation(len(ids))[:max_tracks])) if len(ids) > max_tracks else ids
    values, numeric = label_column(labels, color_by, picked) if labels else (None, False)
    vectors: Vectors = source.read(picked)
    if len(vectors.track_ids) < 3:
        msg = f"{source.model}/{source.layer} has {len(vectors.track_ids)} live track(s): a map needs at least 3"
        raise ConfigError(msg)
    if values is not None:
        # read() sorts by track id; line the labels up with it.
        order = {t: i for i, t in enumerate(picked.to_pylist())}
        values = values[[order[t] for t in vectors.track_ids]]
    points, used = project(vectors.vectors, method, seed)
    return Projection(vectors.track_ids, np.asarray(points, dtype=np.float64), values, numeric, used)


def _categories(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Category names (most frequent first, the tail as "other", missing as "unlabelled") and each track's."""
    text = np.array(["unlabelled" if v is None else str(v) for v in values], dtype=object)
    names, counts = np.unique(text, return_counts=True)
    ranked = [n for _, n in sorted(zip(-counts, names, strict=True))]
    kept = ranked[:MAX_CATEGORIES] if len(ranked) <= MAX_CATEGORIES + 1 else ranked[: MAX_CATEGORIES - 1]
    text = np.array([t if t in kept else "other" for t in text], dtype=object)
    return kept + (["other"] if "other" in text and "other" not in kept else []), text


def write_png(p: Projection, path: Path, title: str, color_by: str | None) -> None:
    """A scatter plot with a legend (categories) or a colour bar (numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7), dpi=120)
    if p.labels is None:
        ax.scatter(p.points[:, 0], p.points[:, 1], s=14, alpha=0.8, color="tab:blue", label="track")
        ax.legend(loc="best", fontsize=8)
    elif p.numeric:
        values = np.array([np.nan if v is None else float(v) for v in p.labels])
        dots = ax.scatter(p.points[:, 0], p.points[:, 1], c=values, s=14, alpha=0.85, cmap="viridis")
        fig.colorbar(dots, ax=ax, label=color_by)
    else:
        names, text = _categories(p.labels)
        colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
        for i, name in enumerate(names):
            mask = text == name
            ax.scatter(p.points[mask, 0], p.points[mask, 1], s=14, alpha=0.85, color=colours(i % colours.N),
                       label=f"{name} ({int(mask.sum())})")
        ax.legend(title=color_by, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title_fontsize=9)
    ax.set_title(title)
    ax.set_xlabel(f"{p.method} 1")
    ax.set_ylabel(f"{p.method} 2")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_html(p: Projection, path: Path, title: str, color_by: str | None) -> None:
    """One self-contained page: an inline SVG whose points carry their track id and label as hover titles."""
    import matplotlib

    lo, hi = p.points.min(axis=0), p.points.max(axis=0)
    pad = 20
    scaled = pad + (p.points - lo) / np.where(hi > lo, hi - lo, 1.0) * (_SVG_SIZE - 2 * pad)
    scaled[:, 1] = _SVG_SIZE - scaled[:, 1]
    if p.labels is None or p.numeric:
        cmap = matplotlib.colormaps["viridis"]
        if p.labels is None:
            colours = ["#1f77b4"] * len(scaled)
        else:
            values = np.array([np.nan if v is None else float(v) for v in p.labels])
            span = np.nanmax(values) - np.nanmin(values) or 1.0
            colours = ["#999999" if np.isnan(v) else matplotlib.colors.to_hex(cmap((v - np.nanmin(values)) / span))
                       for v in values]
        legend = []
    else:
        names, text = _categories(p.labels)
        cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
        hexes = {name: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, name in enumerate(names)}
        colours = [hexes[t] for t in text]
        legend = [(name, hexes[name]) for name in names]
    dots = []
    for i, (x, y) in enumerate(scaled):
        label = "" if p.labels is None else f" — {color_by}: {p.labels[i]}"
        dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colours[i]}" fill-opacity="0.85">'
                    f"<title>{html.escape(str(p.track_ids[i]) + label)}</title></circle>")
    items = "".join(f'<li><span style="background:{c}"></span>{html.escape(n)}</li>' for n, c in legend)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} svg{{border:1px solid #ccc}} circle:hover{{stroke:#000;stroke-width:2}}
ul{{list-style:none;padding:0}} li span{{display:inline-block;width:.8em;height:.8em;margin-right:.4em}}
.wrap{{display:flex;gap:1em}}</style></head>
<body><h1 style="font-size:1.1em">{html.escape(title)}</h1><p>Hover a point for its track id.</p>
<div class="wrap"><svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_SIZE}" height="{_SVG_SIZE}"
viewBox="0 0 {_SVG_SIZE} {_SVG_SIZE}">{"".join(dots)}</svg>
<div><b>{html.escape(color_by or "")}</b><ul>{items}</ul></div></div></body></html>
"""
    path.write_text(page, encoding="utf-8")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `map` subcommand."""
    parser = subparsers.add_parser(
        "map",
        help="a 2-D map of one model's embeddings (PNG, and an HTML page with track ids on hover)",
        description="Project up to --max-tracks sampled tracks to 2-D (UMAP where installed, else PCA; seeded), "
        "coloured by a label column.",
    )
    add_table_arguments(parser)
    parser.add_argument("--model", help="embedding model (required when the table holds several)")
    parser.add_argument("--layer", help="embedding layer (default: the model's only layer)")
    parser.add_argument("--labels", metavar="FILE", help="labels (CSV, Parquet, Delta) with a track_id column")
    parser.add_argument("--color-by", metavar="COLUMN", help="label column that colours the points")
    parser.add_argument("--png", required=True, metavar="FILE", help="the picture")
    parser.add_argument("--html", metavar="FILE", help="also a self-contained page with track ids on hover")
    parser.add_argument("--max-tracks", type=int, default=20_000, help="sample at most this many tracks")
    parser.add_argument("--method", choices=("auto", "umap", "pca"), default="auto",
                        help="auto: UMAP where umap-learn is installed, else PCA")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    if bool(args.labels) != bool(args.color_by):
        msg = "--labels and --color-by go together: pass both (or neither)"
        raise ConfigError(msg)
    if args.max_tracks < 3:
        msg = f"--max-tracks must be at least 3, got {args.max_tracks}"
        raise ConfigError(msg)
    store = store_from_args(args)
    png = OutputFile.check("--png", args.png, [store], (".png",))
    page = OutputFile.check("--html", args.html, [store], (".html", ".htm")) if args.html else None
    source = ModelLayer(store, args.model, args.layer)
    p = build_projection(source, args.max_tracks, args.method, args.seed, args.labels, args.color_by)
    by = f", coloured by {args.color_by}" if args.color_by else ""
    title = f"{source.model} / {source.layer}: {len(p.track_ids)} tracks ({p.method}{by})"
    png.write(lambda path: write_png(p, path, title, args.color_by))
    written = [args.png]
    if page is not None:
        page.write(lambda path: write_html(p, path, title, args.color_by))
        written.append(args.html)
    print(f"map of {len(p.track_ids)} tracks ({p.method}) -> {', '.join(written)}", file=sys.stderr)
    return 0
