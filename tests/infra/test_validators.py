"""Real validators and linters over infra/ and the code, as CI runs them (offline: the schemas come from installed
packages or tests/infra/schemas/), and each one shown to fail on an injected error, so that a broken manifest,
Dockerfile, script or module fails CI. The tools are console scripts of the [test] extra (requirements.lock)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RAYJOB_SCHEMA = SCHEMAS / "kuberay-1.7.0-rayjob-v1.json"
# The Kubernetes the schedule's kubectl is built for: the manifests are validated against that release's schemas.
KUBECTL_VERSION = re.search(r"^ARG KUBECTL_VERSION=v(\d+\.\d+)\.\d+$",
                            (INFRA / "kuberay" / "kubectl.Dockerfile").read_text(), re.MULTILINE).group(1)
KUBERNETES_MANIFESTS = [INFRA / "kuberay" / "nightly-cronjob.yaml"]  # kustomization.yaml and the RayJob: below
DOCKERFILES = [INFRA / "Dockerfile", INFRA / "kuberay" / "kubectl.Dockerfile"]


def _tool(name: str) -> str:
    """A console script of the [test] extra, from this interpreter's environment first."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make setup` installs it from requirements.lock")
    return found


def _run(*command: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def _broken_copy(source: Path, tmp_path: Path, old: str, new: str) -> Path:
    """`source` copied to tmp_path with one error injected (`old` must occur in it exactly once)."""
    text = source.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {source} exactly once"
    target = tmp_path / source.name
    target.write_text(text.replace(old, new))
    return target


def _shell_scripts() -> list[Path]:
    """Every shell script of the repository: *.sh outside hidden and build folders, and the CI entry points."""
    scripts = [
        path for path in ROOT.rglob("*.sh")
        if not any(part.startswith(".") or part in {"build", "dist"} for part in path.relative_to(ROOT).parts[:-1])
    ]
    scripts += [path for path in (ROOT / ".ci").iterdir() if path.read_text().startswith("#!/usr/bin/env bash")]
    return sorted(scripts)


# kubernetes-validate: the CronJob and its RBAC against the Kubernetes API's own schemas.

def _kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    return _run(_tool("kubernetes-validate"), "--strict", "--kubernetes-version", KUBECTL_VERSION, *paths)


def test_the_kubernetes_manifests_are_valid_for_their_kubernetes():
    result = _kubernetes_validate(*KUBERNETES_MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout + result.stderr, "a resource was not validated"
    documents = sum(len([d for d in yaml.safe_load_all(p.read_text()) if d]) for p in KUBERNETES_MANIFESTS)
    assert result.stdout.count(" passed for resource ") == documents


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("concurrencyPolicy: Forbid", "concurencyPolicy: Forbid", "concurencyPolicy"),  # unknown field (strict)
    ("backoffLimit: 2", "backoffLimit: two", "two"),  # wrong type
], ids=["misspelt-field", "wrong-type"])
def test_kubernetes_validate_fails_on_a_broken_cronjob(tmp_path, old, new, needle):
    broken = _broken_copy(INFRA / "kuberay" / "nightly-cronjob.yaml", tmp_path, old, new)
    result = _kubernetes_validate(broken)
    assert result.returncode != 0 and needle in result.stdout + result.stderr, result.stdout + result.stderr


# check-jsonschema: the RayJob against KubeRay's CRD, the Ray cluster against Ray's own schema.

def _strict(schema: object) -> object:
    """The CRD's schema as `kubectl create` applies it (field validation Strict, its default since Kubernetes
    1.27): an object with declared properties rejects any other field, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict \
            and not strict.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


# Errors injected into copies of rayjob.yaml: (text, replacement, what the report must name).
RAYJOB_BREAKS = {
    "misspelt-field": ("  entrypoint: >-", "  entryPoint: >-", "entryPoint"),
    "wrong-type": ("      - groupName: cpu-decode\n        replicas: 2",
                   "      - groupName: cpu-decode\n        replicas: two", "'two' is not of type 'integer'"),
    "pod-template-field": ('requests: {cpu: "7", memory: 24Gi}', 'request: {cpu: "7", memory: 24Gi}', "'request'"),
    "api-version": ("apiVersion: ray.io/v1", "apiVersion: ray.io/v1alpha1", "'ray.io/v1' was expected"),
}


def _check_jsonschema(schema: Path, *instances: Path) -> subprocess.CompletedProcess:
    return _run(_tool("check-jsonschema"), "--schemafile", schema, *instances)


@pytest.fixture(scope="module")
def rayjob_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[str, Path]]:
    """One check-jsonschema run over rayjob.yaml and a broken copy per RAYJOB_BREAKS case (loading the CRD's
    schema takes it seconds), against the strict schema with the CRD's apiVersion and kind."""
    folder = tmp_path_factory.mktemp("rayjobs")
    schema = _strict(json.loads(RAYJOB_SCHEMA.read_text()))
    schema["properties"]["apiVersion"]["const"] = "ray.io/v1"
    schema["properties"]["kind"]["const"] = "RayJob"
    (folder / "rayjob-strict.json").write_text(json.dumps(schema))
    files = {"valid": INFRA / "kuberay" / "rayjob.yaml"}
    for case, (old, new, _) in RAYJOB_BREAKS.items():
        (folder / case).mkdir()
        files[case] = _broken_copy(files["valid"], folder / case, old, new)
    return _check_jsonschema(folder / "rayjob-strict.json", *files.values()), files


def _errors_about(report: subprocess.CompletedProcess, path: Path) -> list[str]:
    return [line for line in report.stdout.splitlines() if line.strip().startswith(f"{path}::")]


def test_the_rayjob_is_valid_against_kuberays_rayjob_definition(rayjob_report):
    report, files = rayjob_report
    assert report.returncode == 1 and "Schema validation errors" in report.stdout, report.stdout + report.stderr
    assert _errors_about(report, files["valid"]) == []


@pytest.mark.parametrize("case", RAYJOB_BREAKS)
def test_check_jsonschema_fails_on_a_broken_rayjob(rayjob_report, case):
    report, files = rayjob_report
    errors = _errors_about(report, files[case])
    assert errors and RAYJOB_BREAKS[case][2] in "\n".join(errors), report.stdout


def _ray_cluster_schema() -> Path:
    """The schema `ray up` validates a cluster config with, from the installed ray (found without importing it)."""
    (package,) = importlib.util.find_spec("ray").submodule_search_locations
    return Path(package) / "autoscaler" / "ray-schema.json"


def test_the_ray_cluster_is_valid_against_rays_cluster_schema():
    result = _check_jsonschema(_ray_cluster_schema(), INFRA / "ray" / "cluster.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("    docker:\n      worker_run_options:\n        - --gpus all",
     "    docker:\n      worker_run_options: --gpus all", "--gpus all"),  # a string where Ray wants a list
    ("idle_timeout_minutes: 10", "idle_timeout_minute: 10", "idle_timeout_minute"),  # unknown key
], ids=["wrong-type", "unknown-key"])
def test_check_jsonschema_fails_on_a_broken_ray_cluster(tmp_path, old, new, needle):
    broken = _broken_copy(INFRA / "ray" / "cluster.yaml", tmp_path, old, new)
    result = _check_jsonschema(_ray_cluster_schema(), broken)
    assert result.returncode != 0 and needle in result.stdout, result.stdout + result.stderr


# The Dataflow client's types: the Flex Template metadata and the body Cloud Scheduler posts to flexTemplates:launch.

def _dataflow_types():
    from google.cloud.dataflow_v1beta3 import types

    return {"metadata.json": types.TemplateMetadata, "launch-body.json": types.LaunchFlexTemplateRequest}


@pytest.mark.parametrize("name", ["metadata.json", "launch-body.json"])
def test_the_dataflow_files_parse_into_the_dataflow_clients_types(name):
    text = (INFRA / "dataflow" / name).read_text()
    message = _dataflow_types()[name].from_json(text)  # unknown fields and wrong types raise
    assert message, name


@pytest.mark.parametrize(("name", "old", "new", "needle"), [
    ("metadata.json", '"isOptional": true', '"isOptinal": true', "isOptinal"),
    ("metadata.json", '"isOptional": true', '"isOptional": "yes"', "isOptional"),
    ("launch-body.json", '"maxWorkers": 8', '"maxWorker": 8', "maxWorker"),
    ("launch-body.json", '"maxWorkers": 8', '"maxWorkers": "eight"', "maxWorkers"),
], ids=["metadata-misspelt", "metadata-wrong-type", "launch-misspelt", "launch-wrong-type"])
def test_the_dataflow_types_reject_a_broken_file(tmp_path, name, old, new, needle):
    from google.protobuf.json_format import ParseError

    text = (INFRA / "dataflow" / name).read_text()
    first = text.index(old)
    broken = text[:first] + new + text[first + len(old):]
    with pytest.raises(ParseError, match=needle):
        _dataflow_types()[name].from_json(broken)


# hadolint, shellcheck, yamllint, ruff: every finding fails (their strictest thresholds).

def test_hadolint_passes_the_dockerfiles():
    result = _run(_tool("hadolint"), "--no-color", *DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_broken_dockerfile(tmp_path):
    broken = _broken_copy(INFRA / "kuberay" / "kubectl.Dockerfile", tmp_path, "FROM busybox:1.37 AS", "FROM busybox AS")
    result = _run(_tool("hadolint"), "--no-color", broken)
    assert result.returncode != 0 and "DL3006" in result.stdout, result.stdout + result.stderr


def test_shellcheck_passes_every_shell_script():
    scripts = _shell_scripts()
    assert {"bench/device_check.sh", "infra/nightly-gate.sh", "infra/dataflow/launch.sh", ".ci/run"} <= {
        path.relative_to(ROOT).as_posix() for path in scripts}
    result = _run(_tool("shellcheck"), *scripts)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("old", "new", "needle"), [
    ('--report "${REPORT}"', "--report ${REPORT}", "SC2086"),
    ("set -euo pipefail", "set -euo pipefail\n# shellcheck disable=SC2086 (a reason)", "SC1125"),
], ids=["unquoted-variable", "bad-directive"])
def test_shellcheck_fails_on_a_broken_script(tmp_path, old, new, needle):
    broken = _broken_copy(INFRA / "nightly-gate.sh", tmp_path, old, new)
    result = _run(_tool("shellcheck"), broken)
    assert result.returncode != 0 and needle in result.stdout, result.stdout + result.stderr


def _yamllint(*paths: Path) -> subprocess.CompletedProcess:
    return _run(_tool("yamllint"), "--strict", "--config-file", ROOT / ".yamllint.yaml", *paths)


def test_yamllint_passes_the_infra_yaml():
    result = _yamllint(INFRA)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("  backoffLimit: 0\n", "  backoffLimit: 0\n  backoffLimit: 3\n", "key-duplicates"),  # PyYAML keeps the last
    ("  submissionMode: K8sJobMode\n", "  submissionMode: K8sJobMode   \n", "trailing-spaces"),
], ids=["duplicate-key", "trailing-spaces"])
def test_yamllint_fails_on_a_broken_manifest(tmp_path, old, new, needle):
    broken = _broken_copy(INFRA / "kuberay" / "rayjob.yaml", tmp_path, old, new)
    result = _yamllint(broken)
    assert result.returncode != 0 and needle in result.stdout, result.stdout + result.stderr


def _ruff(*args: str | Path) -> subprocess.CompletedProcess:
    return _run(_tool("ruff"), "check", "--no-cache", "--config", ROOT / "pyproject.toml", *args)


def test_ruff_passes_the_repository():
    result = _ruff(".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_fails_on_a_broken_module(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text('"""A module."""\n\nimport os\n\n\ndef f():\n    return undefined_name\n')
    result = _ruff(broken)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "F401" in result.stdout and "F821" in result.stdout, result.stdout
