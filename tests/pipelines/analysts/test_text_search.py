"""`similar --text` on CLAP tables: a tiny random CLAP checkpoint (with its tokenizer) embeds a real catalog through
the real job, and the ranking is checked against `transformers`' own ClapModel.

Tracks are shorter than the checkpoint's one-second window, so each track's `pooled` embedding is one window's
`audio_embeds`, which ClapModel computes from the feature extractor's features of the decoded track.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from catalog_embed.pipelines.embed.config import EmbedConfig
from catalog_embed.pipelines.embed.job import run_embed
from catalog_embed.pipelines.io.store import TableStore
from catalog_embed.workers.audio import DecodeConfig, load_audio
from catalog_embed.workers.demo_catalog import DemoCatalogConfig, render_demo_catalog
from catalog_embed.workers.stages import EncoderConfig
from tests.helpers import hf_checkpoints
from tests.helpers.cli import run_cli
from tests.helpers.tables import commit, ids, mixture

transformers = pytest.importorskip("transformers")

TEXTS = ("solo piano, slow", "loud drums")
N_TRACKS = 5
# The tracks are shorter than the default 1 s minimum on purpose (one window each).
DECODE = DecodeConfig(min_duration_s=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random CLAP checkpoint folder, tokenizer included."""
    return str(hf_checkpoints.clap(tmp_path_factory.mktemp("hf") / "clap"))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Five real tracks of 0.8 s (one window of the checkpoint's 1 s)."""
    config = DemoCatalogConfig(n_tracks=N_TRACKS, duration_s=0.8, n_broken=0, seed=5, codecs=("flac", "mp3"))
    return render_demo_catalog(tmp_path_factory.mktemp("catalog"), config)


def _embed(catalog, out, model: str, layers: tuple[str, ...] = ()) -> str:
    """`catalog` embedded with `model` under `out` by the real job."""
    encoder = EncoderConfig(model=model, layers=layers)
    config = EmbedConfig(catalog=str(catalog.manifest_path), out=str(out), encoder=encoder, workers=1, decode=DECODE)
    summary = run_embed(config, Console(quiet=True))
    assert summary.stats.n_embedded == N_TRACKS
    return str(out)


@pytest.fixture(scope="module")
def tables(checkpoint, catalog, tmp_path_factory) -> str:
    """The catalog embedded with `hf:<checkpoint>`: layer pooled (the rows'), hidden_0 as an extra column."""
    return _embed(catalog, tmp_path_factory.mktemp("clap") / "tables", f"hf:{checkpoint}", ("pooled", "hidden_0"))


def _reference(checkpoint: str, catalog, texts: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Track ids and cosine(text_embeds, audio_embeds) per text, from transformers' ClapModel on the feature
    extractor's features and the tokenizer's ids."""
    model = transformers.ClapModel.from_pretrained(checkpoint).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    rows = pq.read_table(catalog.manifest_path).to_pylist()
    clips = [load_audio(row["uri"], extractor.sampling_rate, DECODE).samples for row in rows]
    features = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="pt")
    with torch.inference_mode():
        audio = model.get_audio_features(input_features=features["input_features"]).pooler_output
        text = model.get_text_features(**tokenizer(list(texts), padding=True, return_tensors="pt")).pooler_output
    audio = torch.nn.functional.normalize(audio, dim=-1)
    return [row["track_id"] for row in rows], (text @ audio.T).numpy()


def _search(capsys, out: str, *options: str) -> tuple[int, str, str]:
    return run_cli(capsys, "similar", "--out", out, *options)


def test_text_search_ranks_tracks_as_clap_compares_text_and_audio(checkpoint, catalog, tables, capsys) -> None:
    """Every track, ranked by cosine(text_embeds, audio_embeds) of transformers' ClapModel, similarities within
    1e-4; --json gives one object per (text, rank)."""
    track_ids, cosine = _reference(checkpoint, catalog, TEXTS)
    code, out, err = _search(capsys, tables, "--text", TEXTS[0], "--text", TEXTS[1], "--k", str(N_TRACKS), "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [set(row) for row in rows] == [{"query_text", "rank", "track_id", "similarity"}] * 2 * N_TRACKS
    for q, text in enumerate(TEXTS):
        found = [row for row in rows if row["query_text"] == text]
        assert [row["rank"] for row in found] == list(range(1, N_TRACKS + 1))
        expected = np.argsort(-cosine[q], kind="stable")
        # The ranking is meaningful only where neighbouring similarities differ by more than the tolerance.
        assert np.min(-np.diff(cosine[q][expected])) > 1e-4
        assert [row["track_id"] for row in found] == [track_ids[i] for i in expected]
        assert np.allclose([row["similarity"] for row in found], cosine[q][expected], rtol=0, atol=1e-4)


def test_text_search_through_the_index_matches_exact_search(tables, capsys) -> None:
    """With the index forced (`--search index`), the answer is exact search's and the index is named."""
    code, _, err = run_cli(capsys, "index", "--out", tables, "--layer", "pooled")
    assert code == 0, err
    code, exact, _ = _search(capsys, tables, "--text", TEXTS[0], "--k", "3", "--json")
    assert code == 0
    code, indexed, err = _search(capsys, tables, "--text", TEXTS[0], "--k", "3", "--json", "--search", "index",
                                 "--recall")
    assert code == 0, err
    exact, indexed = json.loads(exact), json.loads(indexed)
    assert [row["track_id"] for row in indexed] == [row["track_id"] for row in exact]
    assert np.allclose([row["similarity"] for row in indexed], [row["similarity"] for row in exact], atol=1e-6)
    assert "recall@3 against exact search: 1.000 (1 of 1 queries" in err
    code, table, _ = _search(capsys, tables, "--text", TEXTS[0], "--k", "3", "--search", "index")
    assert code == 0 and "index (usearch" in table and "query_text" in table


def _refused(capsys, out: str, *options: str) -> str:
    code, stdout, err = _search(capsys, out, *options)
    assert code == 2 and not stdout
    assert err.startswith("catalog-embed: error: ") and err.count("\n") == 1
    return err


def test_a_layer_other_than_pooled_is_refused(tables, capsys) -> None:
    """hidden_0 is not in the space the text tower projects to."""
    err = _refused(capsys, tables, "--text", "piano", "--layer", "hidden_0")
    assert "layer 'pooled'" in err and "not 'hidden_0'" in err and "--layer pooled" in err


def test_text_and_track_queries_together_are_refused(tables, capsys) -> None:
    """One kind of query per command; an empty text is refused too."""
    err = _refused(capsys, tables, "--text", "piano", "--track", "demo-0000")
    assert "--text searches by text, --track/--tracks by tracks" in err
    err = _refused(capsys, tables, "--text", " ")
    assert "--text is empty" in err


def test_a_table_of_another_model_is_refused(catalog, tmp_path, capsys) -> None:
    """mfcc-stats has no text tower."""
    out = _embed(catalog, tmp_path / "tables", "mfcc-stats")
    err = _refused(capsys, out, "--text", "piano")
    assert "needs a table embedded with a CLAP checkpoint" in err and "'mfcc-stats' is not one" in err


def test_a_table_of_another_version_of_the_checkpoint_is_refused(checkpoint, catalog, tmp_path, capsys) -> None:
    """After the checkpoint's weights change, its text tower is no longer the one the rows were embedded with."""
    folder = tmp_path / "clap"
    shutil.copytree(checkpoint, folder)
    out = _embed(catalog, tmp_path / "tables", f"hf:{folder}")
    capsys.readouterr()
    code, _, err = _search(capsys, out, "--text", "piano")
    assert code == 0 and not err, err
    model = transformers.ClapModel.from_pretrained(folder)
    with torch.no_grad():
        model.text_projection.linear1.weight.add_(0.1)
    model.save_pretrained(folder)
    capsys.readouterr()  # transformers' own loading report, not the command's
    err = _refused(capsys, out, "--text", "piano")
    assert "but the table's rows are version local-" in err and "restore the weights" in err


def test_a_table_holding_several_versions_of_the_model_is_refused(checkpoint, tmp_path, capsys) -> None:
    """Rows of two versions (some tracks re-embedded with other weights): no one text tower fits them all."""
    store = TableStore(str(tmp_path / "tables"))
    store.ensure_tables()
    vectors = mixture(4, 32, 0)
    commit(store, "r1", f"hf:{checkpoint}", dict(zip(ids(2), vectors[:2], strict=True)), version="local-aaaa")
    commit(store, "r2", f"hf:{checkpoint}", dict(zip(ids(2, "u"), vectors[2:], strict=True)), version="local-bbbb")
    err = _refused(capsys, store.root, "--text", "piano")
    assert "rows hold versions local-aaaa, local-bbbb: text search needs one; re-embed the catalog" in err
