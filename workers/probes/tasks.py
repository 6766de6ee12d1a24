"""Probe task kinds and the key classes: the light part of the probe vocabulary, imported by the CLI too."""

from __future__ import annotations

from enum import StrEnum


class TaskKind(StrEnum):
    """What a probe predicts, which fixes its loss, output activation and metrics."""

    MULTILABEL = "multilabel"
    MULTICLASS = "multiclass"
    REGRESSION = "regression"
    KEY = "key"


# Key classes: index = semitone of the tonic above C + 12 for minor. Names are mir_eval.key strings.
_PITCHES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
KEY_CLASSES = tuple(f"{pitch} {mode}" for mode in ("major", "minor") for pitch in _PITCHES)
