"""The embed configuration is declared once: every field of `EmbedConfig` has one `Option`, and the command line,
its defaults and its checks all come from that declaration."""

from __future__ import annotations

import dataclasses
import json

import pytest

from catalog_embed.pipelines.cli import build_parser
from catalog_embed.pipelines.embed.config import OPTIONS, EmbedConfig, config_from_args, from_saved
from catalog_embed.schemas.errors import ConfigError


def _leaf_paths(config: object, prefix: str = "") -> set[str]:
    paths = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            paths |= _leaf_paths(value, f"{prefix}{f.name}.")
        else:
            paths.add(f"{prefix}{f.name}")
    return paths


def _parsed(*flags: str) -> EmbedConfig:
    return config_from_args(build_parser().parse_args(["embed", "--catalog", "c", "--out", "o", *flags]))


def test_every_field_has_exactly_one_option():
    declared = [option.path for option in OPTIONS]
    assert len(declared) == len(set(declared))
    assert set(declared) == _leaf_paths(EmbedConfig(catalog="c", out="o"))
    flags = [option.flag for option in OPTIONS]
    assert len(flags) == len(set(flags))


def test_the_command_line_defaults_are_the_config_defaults():
    assert _parsed() == EmbedConfig(catalog="c", out="o")


def test_values_reach_the_nested_configs():
    config = _parsed(
        "--layer", "a, b", "--max-duration", "60", "--allow-prefix", "/x", "--allow-prefix", "/y",
        "--storage-option", "K=V", "--beam-option", "network=n", "--no-compile", "--windows",
    )
    assert config.encoder.layers == ("a", "b") and config.encoder.compile is False
    assert config.decode.max_duration_s == 60.0 and config.write_windows is True
    assert config.policy.allow_prefixes == ("/x", "/y") and config.storage_options == {"K": "V"}
    assert config.beam.pipeline_args == ("--network=n",)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--workers", "0"), "--workers must be at least 1, got 0"),
        (("--shard-size", "0"), "--shard-size must be at least 1"),
        (("--batch-windows", "0"), "--batch-windows must be at least 1"),
        (("--max-failure-ratio", "2"), "--max-failure-ratio must be in [0, 1]"),
        (("--decode-timeout", "0"), "--decode-timeout must be positive"),
        (("--decode-memory-mb", "8"), "--decode-memory-mb must be at least 64"),
        (("--runner", "spark"), "--runner must be one of local, beam, dataflow, ray"),
        (("--run-id", "../x"), "--run-id must be 1 to 128 letters"),
    ],
)
def test_each_option_checks_its_own_rule(flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _parsed(*flags).validate()


def test_a_saved_config_reads_back_through_its_dataclasses_and_a_renamed_field_is_an_error():
    config = _parsed("--layer", "a,b", "--max-duration", "60", "--allow-prefix", "/data")
    saved = json.loads(json.dumps(dataclasses.asdict(config)))  # as the runs row holds it
    assert from_saved(EmbedConfig, saved) == config
    saved["decode"]["max_seconds"] = saved["decode"].pop("max_duration_s")
    with pytest.raises(ConfigError, match="decode.max_seconds"):
        from_saved(EmbedConfig, saved)
