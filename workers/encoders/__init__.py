"""Encoder registry: names users pass to `--model`, mapped to the classes that implement them.

A new encoder is a module in this package with an `Encoder` subclass, plus one line in `_REGISTRY`. Modules are
imported lazily so listing models stays cheap and an encoder's optional dependencies are only needed when used.

Users bring their own encoder without touching the registry: a name ending in `.json` is the path or URI of an
encoder config (TorchScript, ONNX or a Python factory; see `catalog_embed.workers.encoders.custom`), a name
starting with `hf:` is a `transformers` audio checkpoint (see `catalog_embed.workers.encoders.hf`), and one starting
with `hear:` a module following the HEAR 2021 API (see `catalog_embed.workers.encoders.hear`).
"""

from __future__ import annotations

import importlib
from typing import Any

from catalog_embed.schemas.errors import EncoderError
from catalog_embed.workers.encoders.base import Encoder, FrontEnd, LayerSpec, Licence

__all__ = [
    "CONFIG_SUFFIX", "HEAR_PREFIX", "HF_PREFIX", "Encoder", "FrontEnd", "LayerSpec", "Licence", "encoder_names",
    "get_encoder",
]

CONFIG_SUFFIX = ".json"
"""Model names ending so are bring-your-own encoder configs, not registry names."""

HF_PREFIX = "hf:"
"""Model names starting so are `transformers` checkpoints: `hf:<repo-id or local path>[@revision]`."""
HF_OPTIONS = ("trust_remote_code", "window_s")
"""Options `hf:` encoders take (`window_s` is also `hear:`'s); other encoders refuse them."""

HEAR_PREFIX = "hear:"
"""Model names starting so are HEAR 2021 API modules: `hear:<module>`, a model file by `--weights`."""
HEAR_OPTIONS = ("weights", "weights_sha256", "window_s")
"""Options `hear:` encoders take."""

# prefix -> ("module:Class", the options it takes): names that are not registered but parsed by the class.
_PREFIXED: dict[str, tuple[str, tuple[str, ...]]] = {
    HF_PREFIX: ("catalog_embed.workers.encoders.hf:HFEncoder", HF_OPTIONS),
    HEAR_PREFIX: ("catalog_embed.workers.encoders.hear:HearEncoder", HEAR_OPTIONS),
}

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
            resolvable `hf:` name nor a well-formed `hear:` name, or options the encoder does not take
            (`HF_OPTIONS` outside `hf:` and `hear:`, weights for `hf:`, whose weights are the checkpoint's).
    """
    for prefix, (target, allowed) in _PREFIXED.items():
        if name.startswith(prefix):
            extra = sorted(set(options) - set(allowed))
            if extra:
                takes = ", ".join(f"--{o.replace('_', '-')}" for o in allowed)
                msg = f"model {name!r} takes only {takes} of the encoder options: drop --{extra[0].replace('_', '-')}"
                raise EncoderError(msg)
            module_name, class_name = target.split(":")
            return getattr(importlib.import_module(module_name), class_name)(name, **options)
    if set(options) & set(HF_OPTIONS):
        flags = ", ".join(f"--{o.replace('_', '-')}" for o in HF_OPTIONS if o in options)
        takers = "hf: and hear:" if set(options) & set(HF_OPTIONS) <= set(HEAR_OPTIONS) else "hf:"
        msg = f"{flags} applies to {takers} models only, not {name!r}: drop it"
        raise EncoderError(msg)
    if name.endswith(CONFIG_SUFFIX):
        custom = importlib.import_module("catalog_embed.workers.encoders.custom")
        return custom.load_custom_encoder(name, **options)
    try:
        target = _REGISTRY[name]
    except KeyError:
        msg = (
            f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)} (see `catalog-embed models`), "
            f"pass an encoder config ending in {CONFIG_SUFFIX}, a transformers checkpoint as {HF_PREFIX}<repo-id>, "
            f"or a HEAR 2021 module as {HEAR_PREFIX}<module>"
        )
        raise EncoderError(msg) from None
    module_name, class_name, *variant = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(*variant, **options)
