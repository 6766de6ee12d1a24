"""Failpoints fire where configured, for the keys that match, as often as told."""

from __future__ import annotations

import pytest

from catalog_embed.workers import failpoints


def test_a_counted_raise_fires_that_often_then_lets_the_retry_through(monkeypatch):
    monkeypatch.setattr(failpoints, "_hits", {})
    monkeypatch.setenv(failpoints.ENV, "write_shard=raise*2:000-000003; commit.runs=raise")
    failpoints.hit("write_shard", "000-000001")  # another key: nothing happens
    for _ in range(2):
        with pytest.raises(failpoints.FailpointError, match="write_shard at '000-000003'"):
            failpoints.hit("write_shard", "000-000003")
    failpoints.hit("write_shard", "000-000003")  # the third hit passes
    for _ in range(3):  # uncounted: every hit
        with pytest.raises(failpoints.FailpointError):
            failpoints.hit("commit.runs", "any")


def test_unset_failpoints_do_nothing(monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.hit("commit.runs", "any")


def test_a_sleep_slows_the_matching_hits_only(monkeypatch):
    slept = []
    monkeypatch.setattr(failpoints, "_hits", {})
    monkeypatch.setattr(failpoints.time, "sleep", slept.append)
    monkeypatch.setenv(failpoints.ENV, "decode=sleep(0.25)*1:track-07")
    failpoints.hit("decode", "/c/track-01.mp3")
    failpoints.hit("decode", "/c/track-07.mp3")
    failpoints.hit("decode", "/c/track-07.mp3")  # counted: the second hit passes
    assert slept == [0.25]
