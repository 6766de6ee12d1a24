"""The compute side of the embed job: decoding, encoders and the shard core that every runner shares.

Before torch loads (every module here that needs it is imported through this package): GNU OpenMP's threads, torch's
intra-op pool on Linux, spin on a core for a while after each parallel region unless told to sleep. Spinning steals
the cores the decode children share with the encoder: on 2 cores, 2,000 one-second clips with `mfcc-stats` took
10.3 s of wall and 9.1 s of the encoder process's CPU spinning, 8.4 s and 5.7 s sleeping; `make demo`'s musicnn runs
as fast either way (123 and 125x real time). An explicit OMP_WAIT_POLICY wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
