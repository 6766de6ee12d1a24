"""infra/: every file parses, every command line in it is one `catalog-embed embed` accepts (and validates), and the
files agree with each other and with the tested versions in requirements.lock (Python, Beam, Ray, extras, paths).
The external validators and linters run in test_validators.py."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from catalog_embed.pipelines.cli import build_parser
from catalog_embed.pipelines.embed.config import EmbedConfig, config_from_args
from catalog_embed.pipelines.runners.flex_template import parse_launcher_args

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = (ROOT / "requirements.lock").read_text()
# Values for the shell scripts' variables, as a user would set them.
SHELL_VARS = {"PROJECT": "my-project", "REGION": "us-central1", "BUCKET": "my-bucket", "TAG": "0.1.0"}
SHELL_VARS |= {
    "IMAGE": "us-central1-docker.pkg.dev/my-project/catalog-embed/worker:0.1.0",
    "LAUNCHER_IMAGE": "us-central1-docker.pkg.dev/my-project/catalog-embed/launcher:0.1.0",
    "TEMPLATE": "gs://my-bucket/templates/catalog-embed-0.1.0.json",
}


def _pin(name: str) -> str:
    """The version requirements.lock pins (what CI tests and the images install), e.g. 'apache-beam' -> '2.77.0'."""
    match = re.search(rf"^{re.escape(name)}==([^\s;]+)", LOCK, re.MULTILINE)
    assert match, f"{name} is not pinned in requirements.lock"
    return match.group(1)


def _substitute(text: str) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: SHELL_VARS.get(m.group(1) or m.group(2), m.group(0)), text)


def _yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _command_lines(path: Path) -> list[str]:
    """Every `catalog-embed embed ...` command line in a file: at the start of a line (commented examples
    included, continuations joined) or after `--` (as `ray job submit ... --` runs it), and in YAML values."""
    lines = path.read_text().splitlines()
    if path.suffix == ".yaml":
        # In YAML, a command outside a comment is a value (maybe folded over lines): parsed below instead.
        lines = [line for line in lines if line.lstrip().startswith("#")]
    uncommented = "\n".join(re.sub(r"^\s*#\s?", "", line) for line in lines)
    joined = re.sub(r"\\\n\s*", " ", uncommented)
    commands = re.findall(r"(?:^|-- )\s*(catalog-embed embed\b[^\n`]*)", joined, re.M)
    if path.suffix == ".yaml":
        commands += [value for value in _strings(_yaml_docs(path)) if value.startswith("catalog-embed embed")]
    return [command.strip() for command in commands]


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    return [s for child in node for s in _strings(child)] if isinstance(node, list) else []


def _embed_config(command: str) -> EmbedConfig:
    """Parse one command line with the real CLI parser and validate the config it yields."""
    argv = shlex.split(_substitute(command))[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`catalog-embed` rejects: {command} (exit {exc.code})")
    config = config_from_args(args)
    config.validate()
    return config


def _files(*patterns: str) -> list[Path]:
    return sorted(path for pattern in patterns for path in INFRA.rglob(pattern))


COMMANDS = [(path, command) for path in _files("*.md", "*.yaml", "*.sh") for command in _command_lines(path)]
RAYJOB = _yaml_docs(INFRA / "kuberay" / "rayjob.yaml")[0]


def test_every_yaml_and_json_file_parses():
    assert {p.name for p in _files("*.yaml")} >= {"cluster.yaml", "rayjob.yaml", "nightly-cronjob.yaml",
                                                  "kustomization.yaml"}
    for path in _files("*.yaml"):
        assert _yaml_docs(path), path
    for path in _files("*.json"):
        json.loads(path.read_text())


@pytest.mark.parametrize("script", _files("*.sh"), ids=lambda p: p.name)
def test_shell_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


def test_the_infra_files_show_commands_for_every_runner_that_leaves_the_machine():
    runners = {_embed_config(command).runner for _, command in COMMANDS}
    assert {"beam", "dataflow", "ray"} <= runners
    assert len(COMMANDS) >= 6


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_command_line_is_one_our_cli_accepts(path, command):
    _embed_config(command)


def test_the_rayjob_entrypoint_is_our_command_and_fits_its_cluster():
    config = _embed_config(RAYJOB["spec"]["entrypoint"])
    assert (config.runner, config.ray.address, config.encoder.device) == ("ray", "auto", "cuda")
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _pin("ray")
    groups = cluster["workerGroupSpecs"]
    gpus = sum(
        g["maxReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in groups for c in g["template"]["spec"]["containers"]
    )
    cpus = sum(
        g["maxReplicas"] * int(c["resources"]["limits"]["cpu"])
        for g in groups for c in g["template"]["spec"]["containers"] if "nvidia.com/gpu" not in c["resources"]["limits"]
    )
    assert 1 <= config.ray.embed_actors <= gpus, "every encoder actor needs a GPU"
    assert config.workers <= cpus, "more decode tasks than CPU workers can run"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_one_worker_image_everywhere():
    images = {c["image"] for c in _containers(RAYJOB)}
    images.add(_yaml_docs(INFRA / "ray" / "cluster.yaml")[0]["docker"]["image"])
    assert images == {"us-central1-docker.pkg.dev/my-project/catalog-embed/worker:0.1.0"}
    launch = _substitute((INFRA / "dataflow" / "launch.sh").read_text())
    assert f"sdk_container_image={SHELL_VARS['IMAGE']}" in launch


def _containers(manifest: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(node.get("containers", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return found


def test_the_nightly_cronjob_creates_the_rayjob_from_the_generated_configmap():
    kustomization = _yaml_docs(INFRA / "kuberay" / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (INFRA / "kuberay" / resource).is_file()
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["rayjob.yaml"] and kustomization["generatorOptions"]["disableNameSuffixHash"]
    docs = {doc["kind"]: doc for doc in _yaml_docs(INFRA / "kuberay" / "nightly-cronjob.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == generator["name"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["command"] == ["kubectl", "create", "-f", f"{mount}/rayjob.yaml"]
    # `kubectl create` of a manifest with generateName makes a new RayJob every night.
    assert RAYJOB["metadata"]["generateName"] and "name" not in RAYJOB["metadata"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert {"create"} <= set(docs["Role"]["rules"][0]["verbs"]) and docs["Role"]["rules"][0]["resources"] == ["rayjobs"]


def test_the_nightly_cronjob_runs_the_kubectl_image_we_build():
    """bitnami/kubectl's versioned tags are gone: the CronJob runs our kubectl image, whose tag is the kubectl
    release that kubectl.Dockerfile downloads and checks against its sha256."""
    dockerfile = (INFRA / "kuberay" / "kubectl.Dockerfile").read_text()
    version = re.search(r"^ARG KUBECTL_VERSION=(v\d+\.\d+\.\d+)$", dockerfile, re.M).group(1)
    assert re.search(r"^ARG KUBECTL_SHA256=[0-9a-f]{64}$", dockerfile, re.M)
    assert "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/amd64/kubectl" in dockerfile
    assert 'printf \'%s  %s\\n\' "${KUBECTL_SHA256}" /kubectl' in dockerfile and "sha256sum -c" in dockerfile
    docs = {doc["kind"]: doc for doc in _yaml_docs(INFRA / "kuberay" / "nightly-cronjob.yaml")}
    (container,) = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    worker = RAYJOB["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == f"{worker.rsplit('/', 1)[0]}/kubectl:{version}"
    readme = (INFRA / "README.md").read_text()
    assert "kubectl.Dockerfile" in readme and f"kubectl:{version}" in readme


def test_gpu_flags_only_on_the_ray_node_types_with_gpus():
    cluster = _yaml_docs(INFRA / "ray" / "cluster.yaml")[0]
    docker = cluster["docker"]
    keys = ("run_options", "head_run_options", "worker_run_options")
    shared = [option for key in keys for option in docker.get(key, [])]
    assert not [option for option in shared if "--gpus" in option or "nvidia" in option]
    types = cluster["available_node_types"]
    for name, node in types.items():
        options = node.get("docker", {}).get("worker_run_options", [])
        has_gpus = node["resources"].get("GPU", 0) > 0
        assert ("--gpus all" in options) == has_gpus, name
        assert has_gpus == bool(node["node_config"].get("guestAccelerators")), name
    assert any(node["resources"].get("GPU", 0) for node in types.values())


def _launcher_config(parameters: dict[str, str], environment: dict[str, str]) -> EmbedConfig:
    """What the Flex Template launcher hands our entry point: parameters and Dataflow's options as --name=value."""
    argv = [f"--{name}={_substitute(value)}" for name, value in {**environment, **parameters}.items()]
    config = replace(config_from_args(parse_launcher_args(argv)), runner="dataflow")
    config.validate()
    return config


def _metadata_names() -> set[str]:
    return {p["name"] for p in json.loads((INFRA / "dataflow" / "metadata.json").read_text())["parameters"]}


def test_every_flex_template_parameter_is_one_of_our_flags():
    samples = {"batch_windows": "64", "shard_size": "64", "decode_timeout": "300", "max_failure_ratio": "0.5",
               "maintain_target_mb": "100"}
    for name in _metadata_names():
        required = ["--catalog=gs://my-bucket/catalog.parquet", "--out=gs://my-bucket/tables"]
        args = parse_launcher_args([*required, f"--{name}={samples.get(name, 'gs://my-bucket/x')}"])
        assert args.beam_option == [], f"metadata parameter {name} is not a catalog-embed embed flag"


def test_the_flex_template_launch_command_and_the_nightly_body_launch_valid_runs():
    launch = (INFRA / "dataflow" / "launch.sh").read_text()
    (raw,) = re.findall(r'--parameters "\^~\^([^"]+)"', launch)
    from_cli = dict(item.split("=", 1) for item in raw.split("~"))
    environment = {"project": "my-project", "region": "us-central1", "temp_location": "gs://my-bucket/tmp"}
    body = json.loads((INFRA / "dataflow" / "launch-body.json").read_text())["launchParameter"]
    from_scheduler = body["parameters"]
    for parameters in (from_cli, from_scheduler):
        assert set(parameters) <= _metadata_names(), "Dataflow refuses parameters the metadata does not declare"
        config = _launcher_config(parameters, environment)
        assert (config.encoder.device, config.beam.worker_accelerator) == (
            "cuda", "type:nvidia-l4;count:1;install-nvidia-driver;machine_type:g2-standard-8")
    assert _substitute(body["containerSpecGcsPath"]) == SHELL_VARS["TEMPLATE"]
    nightly = (INFRA / "dataflow" / "nightly.sh").read_text()
    assert "flexTemplates:launch" in nightly and "launch-body.json" in nightly
    placeholders = set(re.findall(r"\$\{(\w+)\}", json.dumps(body)))
    substituted = set(re.findall(r"\$\{(\w+)\}", re.search(r"envsubst '([^']+)'", nightly).group(1)))
    assert placeholders <= substituted


def test_the_dockerfile_builds_our_package_with_the_pinned_engines():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-\w+-ubuntu", dockerfile, re.M)
    python = re.search(r"python3\.(\d+)", PYPROJECT["project"]["requires-python"].replace(">=3.", "python3."))
    assert f"python3.{python.group(1)} -m venv" in dockerfile
    sdk = re.search(r"^ARG BEAM_SDK_IMAGE=apache/beam_python(3\.\d+)_sdk:([\d.]+)$", dockerfile, re.M)
    assert (sdk.group(1), sdk.group(2)) == (f"3.{python.group(1)}", _pin("apache-beam"))
    # The lock's versions as constraints (every pin, no hash), so the image holds what CI tested and the Beam its
    # SDK harness expects.
    assert re.search(r"^COPY pyproject\.toml README\.md requirements\.lock \./$", dockerfile, re.M)
    sed, constraints = re.search(r"sed -n '([^']+)' requirements\.lock > (\S+)", dockerfile).groups()
    derived = subprocess.run(["sed", "-n", sed, str(ROOT / "requirements.lock")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert derived == re.findall(r"^([A-Za-z0-9][\w.-]*==[^\s;]+)", LOCK, re.M) and len(derived) > 100
    extras = re.search(rf'pip install --constraint {constraints} "\.\[([\w,]+)\]"', dockerfile).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert {"dataflow", "ray"} <= set(extras)
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), source
    flex = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/catalog-embed/(\S+)", dockerfile).group(1)
    assert (ROOT / flex).is_file()
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
    assert re.search(r"^FROM worker AS launcher$", dockerfile, re.M)
    kept = (INFRA / "Dockerfile.dockerignore").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert f"!{source}" in kept or f"!{source}/**" in kept, f"{source} is excluded from the build context"
