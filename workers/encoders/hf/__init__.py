"""`transformers` audio checkpoints as encoders: `--model hf:<repo-id or local path>[@revision]`.

`checkpoint` resolves names (hub cache, offline rules), versions and licences; `frontends` computes the feature
extractors' features in torch; `encoder` holds `HFEncoder` and the families it supports; `text` embeds texts with
the text tower of a CLAP checkpoint (`similar --text`).
"""

from catalog_embed.workers.encoders.hf.checkpoint import PREFIX
from catalog_embed.workers.encoders.hf.encoder import HFEncoder

__all__ = ["PREFIX", "HFEncoder"]
