"""`ClapTextEncoder`: the text tower of the CLAP checkpoint a table was embedded with, found by the rows' version
(`similar --text` is tested end to end in tests/pipelines/analysts/test_text_search.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders.hf.checkpoint import weights_digest
from catalog_embed.workers.encoders.hf.text import ClapTextEncoder
from tests.helpers import hf_checkpoints

transformers = pytest.importorskip("transformers")

EMBEDDED = "0123456789abcdef0123456789abcdef01234567"
LATER = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "someone/tiny-clap"


@pytest.fixture(scope="module")
def clap(tmp_path_factory) -> str:
    return str(hf_checkpoints.clap(tmp_path_factory.mktemp("hf") / "clap"))


@pytest.fixture
def hub(clap, tmp_path, monkeypatch) -> str:
    """An offline hub cache holding the snapshot a table was embedded with and a later one with other weights, which
    the default branch names."""
    later = shutil.copytree(clap, tmp_path / "later")
    model = transformers.ClapModel.from_pretrained(clap)
    with torch.no_grad():
        model.text_projection.linear2.weight.mul_(-1)
    model.save_pretrained(later)
    hf_checkpoints.hub_snapshot(tmp_path / "hub", clap, REPO, EMBEDDED)
    hf_checkpoints.hub_snapshot(tmp_path / "hub", later, REPO, LATER)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return f"{EMBEDDED[:12]}-{weights_digest(Path(clap))[:16]}"


def test_the_embedded_snapshot_is_used_after_the_default_branch_moved_on(clap, hub) -> None:
    """The rows' revision names the cached snapshot; its text tower gives ClapModel.get_text_features."""
    texts = ["solo piano, slow", "drums"]
    ours = ClapTextEncoder(f"hf:{REPO}", hub, "pooled").embed(texts)
    model = transformers.ClapModel.from_pretrained(clap).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clap)
    with torch.inference_mode():
        theirs = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    assert ours.shape == (2, 32)
    assert torch.allclose(torch.from_numpy(ours), theirs, rtol=0, atol=1e-5)


def test_a_revision_missing_from_the_cache_is_refused_naming_the_download(hub) -> None:
    """Another revision resolves to the default branch, whose weights are not the rows'."""
    with pytest.raises(EncoderError) as caught:
        ClapTextEncoder(f"hf:{REPO}", "abcdefabcdef" + hub[12:], "pooled")
    message = str(caught.value)
    assert "\n" not in message and f"is version {LATER[:12]}-" in message
    assert f"hf download {REPO} --revision" in message


def test_a_checkpoint_of_another_family_is_refused(tmp_path) -> None:
    """An AST table's pooled layer is not in any text tower's space."""
    folder = hf_checkpoints.ast(tmp_path / "ast")
    with pytest.raises(EncoderError, match="is a checkpoint of the ast family: text search needs a CLAP one"):
        ClapTextEncoder(f"hf:{folder}", "local-0", "pooled")


def test_long_texts_are_truncated_to_the_text_towers_positions(clap) -> None:
    """The tiny text tower has 40 positions (38 tokens after RoBERTa's padding offset): a longer text still
    embeds, as its first 38 tokens."""
    encoder = ClapTextEncoder(f"hf:{clap}", f"local-{weights_digest(Path(clap))[:16]}", "pooled")
    long = "piano " * 40
    model = transformers.ClapModel.from_pretrained(clap).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clap)
    with torch.inference_mode():
        inputs = tokenizer([long], truncation=True, max_length=38, return_tensors="pt")
        theirs = model.get_text_features(**inputs).pooler_output
    assert torch.allclose(torch.from_numpy(encoder.embed([long])), theirs, rtol=0, atol=1e-5)


def test_a_checkpoint_without_tokenizer_files_is_refused(clap, tmp_path) -> None:
    """transformers would build a tokenizer of the special tokens alone, the same ids for every text."""
    folder = shutil.copytree(clap, tmp_path / "clap")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(EncoderError, match="holds no tokenizer files"):
        ClapTextEncoder(f"hf:{folder}", f"local-{weights_digest(folder)[:16]}", "pooled")
