"""JukeMIR: Jukebox 5B's top level as a music feature extractor (`jukemir-5b`).

`config` holds the architecture as data, `model` the network (the VQ-VAE's top-level encoder and codebook, the
top-level prior run only as deep as asked), `checkpoint` the importer of OpenAI's released files, and `encoder`
the front end and the registered encoder.
"""

from catalog_embed.workers.encoders.jukemir.config import JUKEBOX_5B, JukeboxConfig
from catalog_embed.workers.encoders.jukemir.encoder import JukemirEncoder, JukemirFrontEnd

__all__ = ["JUKEBOX_5B", "JukeboxConfig", "JukemirEncoder", "JukemirFrontEnd"]
