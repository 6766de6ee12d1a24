"""Tiny random `transformers` checkpoints (hidden size 32, 2 layers) saved the way the hub serves them.

Each builder writes a config, random weights (safetensors) and the family's feature extractor into a folder, so
that `hf:<folder>` loads it exactly as it would a downloaded snapshot. Windows are about a second long, so a clip
of one window is cheap to embed on two cores.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import torch

SEED = 0


def wav2vec2(folder: Path) -> Path:
    """A wav2vec2 encoder (group-norm feature encoder, as wav2vec2-base) and a normalising extractor, 16 kHz."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(SEED)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=True).save_pretrained(folder)
    return folder


def ast(folder: Path) -> Path:
    """An Audio Spectrogram Transformer over 100 fbank frames (about 1 s) of 32 mel bins."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(SEED)
    config = ASTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_mel_bins=32, max_length=100, patch_size=16, frequency_stride=8, time_stride=8,
    )
    ASTModel(config).save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=32, max_length=100).save_pretrained(folder)
    return folder


def whisper(folder: Path) -> Path:
    """A Whisper model whose encoder takes 1 s windows (100 log-mel frames, 50 positions)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(SEED)
    config = WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50,
        max_target_positions=16, vocab_size=64, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        decoder_start_token_id=2,
    )
    WhisperModel(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(folder)
    return folder


def clap(folder: Path) -> Path:
    """A CLAP model (a two-stage Swin audio tower, a tiny text tower) over 1 s windows at 48 kHz, unfused with the
    extractor's "rand_trunc" truncation, as laion/clap-htsat-unfused, with a tiny tokenizer (see `_clap_tokenizer`)."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    torch.manual_seed(SEED)
    audio = ClapAudioConfig(
        spec_size=128, window_size=4, num_mel_bins=64, depths=(1, 1), num_attention_heads=(2, 2),
        patch_embeds_hidden_size=16, hidden_size=32, projection_dim=32, num_hidden_layers=2,
    )
    text = ClapTextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        projection_dim=32, max_position_embeddings=40,
    )
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=32)
    ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(max_length_s=1, truncation="rand_trunc").save_pretrained(folder)
    _clap_tokenizer().save_pretrained(folder)
    return folder


def _clap_tokenizer():
    """A byte-level BPE tokenizer of the kind CLAP ships (RoBERTa's), written offline: the special tokens, lower-case
    letters, the word-start marker and a few merges, 40 ids in all (the tiny text tower has 64)."""
    from transformers import RobertaTokenizer

    merges = [("Ġ", "s"), ("p", "i"), ("a", "n"), ("o", "w"), ("pi", "an"), ("Ġ", "pian"), ("l", "ow")]
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *string.ascii_lowercase, "Ġ", ","]
    vocab = {token: i for i, token in enumerate(tokens + [a + b for a, b in merges])}
    return RobertaTokenizer(vocab=vocab, merges=merges)


def text_only(folder: Path) -> Path:
    """A BERT checkpoint: a model without any audio feature extractor."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return folder


def hub_snapshot(cache: Path, folder: str | Path, repo: str, commit: str) -> None:
    """Lay `folder` out in a hub cache as `hf download` leaves it, as `commit` of `repo`, which refs/main then
    names."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)


BUILDERS = {"wav2vec2": wav2vec2, "ast": ast, "whisper": whisper, "clap": clap}
"""The supported families' builders, by family name."""
