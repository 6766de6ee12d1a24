"""Encoder registry: names users pass to `--model`, mapped to the classes that implement them.

A new encoder is a module in this package with an `Encoder` subclass, plus one line in `_REGISTRY`. Modules are
imported lazily so listing models stays cheap and an encoder's optional dependencies are only needed when used.

Users bring their own encoder without touching the registry: a name ending in `.json` is the path or URI of an
encoder config (TorchScript, ONNX or a Python factory; see `catalog_embed.workers.encoders.custom`), and a name
starting with `hf:` is a `transformers` audio checkpoint (see `catalog_embed.workers.encoders.hf`).
"""

from __future__ import annotations

import importlib
from typing import Any

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence

__all__ = ["CONFIG_SUFFIX", "HF_PREFIX", "Encoder", "FrontEnd", "LayerSpec", "Licence", "encoder_names", "get_encoder"]

CONFIG_SUFFIX = ".json"
"""Model names ending so are bring-your-own encoder configs, not registry names."""

HF_PREFIX = "hf:"
"""Model names starting so are `transformers` checkpoints: `hf:<repo-id or local path>[@revision]`."""
HF_OPTIONS = ("trust_remote_code", "window_s")
"""Options only `hf:` encoders take."""

# name -> "module:Class[:variant]"; the variant is passed to the class as its first argument.
_REGISTRY: dict[str, str] = {
    "musicnn-msd": "catalog_embed.workers.encoders.musicnn:Musicnn:MSD",
    "musicnn-mtt": "catalog_embed.workers.encoders.musicnn:Musicnn:MTT",
    "mule-sfnfnet-f0": "catalog_embed.workers.encoders.sfnfnet:MuleSfnfnetF0",
    "clmr-samplecnn": "catalog_embed.workers.encoders.clmr:ClmrSampleCnn",
    "clmr-samplecnn-original": "catalog_embed.workers.encoders.clmr:ClmrSampleCnn:original",
    "jukemir-5b": "catalog_embed.workers.encoders.jukemir:JukemirEncoder",
    "mfcc-stats": "catalog_embed.workers.encoders.handcrafted:MfccStats",
    "chroma-stats": "catalog_embed.workers.encoders.handcrafted:ChromaStats",
}


def encoder_names() -> list[str]:
    """Every registered encoder name, in registry order."""
    return list(_REGISTRY)


def get_encoder(name: str, **options: Any) -> Encoder:
    """Construct the encoder registered as `name`, or described by the JSON config `name` (no weights touched).

    Raises:
        EncoderError: `name` is neither registered (the message lists the valid names) nor a valid config nor a
            resolvable `hf:` name, or options the encoder does not take (`HF_OPTIONS` outside `hf:`, weights for
            `hf:`, whose weights are the checkpoint's).
    """
    if name.startswith(HF_PREFIX):
        extra = sorted(set(options) - set(HF_OPTIONS))
        if extra:
            msg = f"model {name!r} loads its weights from the checkpoint: drop --{extra[0].replace('_', '-')}"
            raise EncoderError(msg)
        hf = importlib.import_module("catalog_embed.workers.encoders.hf")
        return hf.HFEncoder(name, **options)
    if set(options) & set(HF_OPTIONS):
        flags = ", ".join(f"--{o.replace('_', '-')}" for o in HF_OPTIONS if o in options)
        msg = f"{flags} applies to hf: models only, not {name!r}: drop it"
        raise EncoderError(msg)
    if name.endswith(CONFIG_SUFFIX):
        custom = importlib.import_module("catalog_embed.workers.encoders.custom")
        return custom.load_custom_encoder(name, **options)
    try:
        target = _REGISTRY[name]
    except KeyError:
        msg = (
            f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)} (see `catalog-embed models`), "
            f"pass an encoder config ending in {CONFIG_SUFFIX}, or a transformers checkpoint as {HF_PREFIX}<repo-id>"
        )
        raise EncoderError(msg) from None
    module_name, class_name, *variant = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(*variant, **options)
