"""Text queries for CLAP tables: the text tower of the very checkpoint a table's audio was embedded with.

CLAP trains an audio and a text tower into one projected space, where a clip's `audio_embeds` (the `pooled` layer
of an `hf:` CLAP table) and a text's `text_embeds` are compared by cosine. Only the `pooled` layer lives in that
space, and only the same weights put both sides there, so the checkpoint is resolved from the table's model name
and its version (revision and weight hash, see `encoder`) must equal the rows'. For a hub checkpoint the snapshot
whose commit starts with the version's revision is taken from the hub cache, so a table keeps its text search
after the repository's default branch moves on. Every check runs before any vector is read.
"""

from __future__ import annotations

import numpy as np
import torch

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders.hf.checkpoint import PREFIX, CheckpointRef, cached_commit
from catalog_embed.workers.encoders.hf.encoder import POOLED, ClapFamily, HFEncoder, load_problem


class ClapTextEncoder:
    """The text tower of the CLAP checkpoint a table's rows were embedded with, checked to be that checkpoint.

    Args:
        model: the rows' model name, `hf:<repo-id or folder>`.
        version: the rows' model version (`<revision>-<weights hash>`).
        layer: the layer searched; only `pooled` shares the text tower's space.

    Raises:
        EncoderError: not an `hf:` CLAP checkpoint, another layer, a checkpoint that does not resolve, whose weights
            are not the rows' version, or that lacks a tokenizer or text tower; one line naming the fix.
    """

    def __init__(self, model: str, version: str, layer: str) -> None:
        if not model.startswith(PREFIX):
            msg = (
                f"text search needs a table embedded with a CLAP checkpoint (--model hf:<CLAP repo-id or folder>, "
                f"layer pooled); {model!r} is not one: pass --model naming such a model, or search by --track"
            )
            raise EncoderError(msg)
        if layer != POOLED:
            msg = (
                f"text search needs {model}'s layer 'pooled' (audio_embeds, the space CLAP's text tower shares), not "
                f"{layer!r}: pass --layer pooled, or embed it with `catalog-embed embed --model {model} --layer pooled`"
            )
            raise EncoderError(msg)
        encoder = HFEncoder(checkpoint=_pinned(model, version))
        encoder.prepare()
        if not isinstance(encoder.family, ClapFamily):
            msg = (
                f"{model} is a checkpoint of the {encoder.family.name} family: text search needs a CLAP one (its text "
                "tower shares the space of its audio embeddings); search by --track instead"
            )
            raise EncoderError(msg)
        if encoder.version != version:
            ref = CheckpointRef.parse(model)
            fix = "restore the weights it was embedded with" if ref.local else (
                f"put revision {version.partition('-')[0]} in the hub cache with `hf download {ref.source} --revision "
                "<that commit>`"
            )
            msg = (
                f"{model} is version {encoder.version} here but the table's rows are version {version}: text search "
                f"needs the same weights: {fix}, or re-embed with `catalog-embed embed --model {model}`"
            )
            raise EncoderError(msg)
        from transformers import AutoTokenizer  # transformers only once a checkpoint has passed the checks

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(encoder.folder)
            self._network = encoder.family.load_text(encoder.folder)
        except (OSError, ValueError, TypeError) as exc:  # TypeError: no tokenizer class for the files present
            raise EncoderError(load_problem(model, "its tokenizer or text tower", exc)) from None
        # Without tokenizer files transformers builds a tokenizer of the special tokens alone, which would turn
        # every text into the same ids.
        if len(self._tokenizer) <= len(self._tokenizer.all_special_ids):
            msg = (
                f"{model}: {encoder.folder} holds no tokenizer files (vocab.json and merges.txt, or tokenizer.json) "
                "for the text tower: download the whole checkpoint"
            )
            raise EncoderError(msg)
        text = encoder.family.config.text_config
        # Roberta-style positions start after the padding index: longer token sequences have no position embedding.
        self._max_tokens = min(self._tokenizer.model_max_length, text.max_position_embeddings - text.pad_token_id - 1)

    def embed(self, texts: list[str]) -> np.ndarray:
        """`text_embeds` of each text, L2-normalised as CLAP compares them, as (len(texts), dim) float32 rows.

        Texts longer than the text tower's positions are truncated, as CLAP's tokenizer does.
        """
        inputs = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_tokens,
                                 return_tensors="pt")
        with torch.inference_mode():
            out = self._network(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            embeds = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return embeds.numpy().astype(np.float32)


def _pinned(model: str, version: str) -> str:
    """`model` at the cached hub snapshot its version's revision names, where the cache holds one; else as given
    (a local folder, or the repository's default branch, whose version is then checked)."""
    ref = CheckpointRef.parse(model)
    commit = None if ref.local else cached_commit(ref.source, version.partition("-")[0])
    return f"{model}@{commit}" if commit else model
