"""infra/ without a Docker engine or a cluster: everything that can be checked by reading the files.

The image installs the project exactly as the README does; the compose file wires server, database, MinIO
and worker together; the Kubernetes manifests and the work pool's base job template fit each other and the
Kubernetes deployment command of infra/README.md (the deployment is defined once, in flows/scheduled.py).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from conftest import REPO

INFRA = REPO / "infra"


def load_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        pytest.fail(f"{path}: not valid YAML: {e}")


# ------------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (INFRA / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1] if " " in item else "") for item in logical]


def install_steps(command: str) -> list[list[str]]:
    """`python -m venv .venv && .venv/bin/pip install -e '.[dev]' && ...` -> the steps that install, as tokens,
    up to the first one that runs something."""
    steps = []
    for step in command.split("&&"):
        tokens = shlex.split(step.split("#")[0])
        if not tokens or tokens[0].endswith("/python") and "venv" not in tokens:
            break
        steps.append(tokens)
    return steps


def without_extras(steps: list[list[str]]) -> list[list[str]]:
    # `-e '.[dev]'` and `-e .` install the same project; only the optional extras differ.
    return [[re.sub(r"^\.\[[\w,-]+\]$", ".", token) for token in step] for step in steps]


def readme_install_command() -> str:
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            if "pip install" in line:
                return line
    pytest.fail("README.md: no `pip install` command in a bash block")


def test_image_installs_the_project_exactly_as_the_readme():
    readme = install_steps(readme_install_command())
    assert readme and readme[0][:3] == ["python", "-m", "venv"], readme
    runs = [args for instruction, args in dockerfile_instructions()
            if instruction == "RUN" and re.search(r"\bpip install\b", args)]
    assert len(runs) == 1, f"infra/Dockerfile: expected one RUN that installs with pip, found {runs}"
    image = install_steps(runs[0])
    assert without_extras(image) == without_extras(readme), (
        f"infra/Dockerfile installs with {image}, README.md with {readme}: keep them identical "
        f"(the image may leave out the [dev] extras)")


def test_torch_comes_from_the_pyproject_pins_only():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pyproject and '"torchvision==0.29.1"' in pyproject
    for instruction, args in dockerfile_instructions():
        assert not (instruction == "RUN" and re.search(r"\btorch(vision)?\b", args)), (
            f"infra/Dockerfile installs torch itself ({args}); the pair must come from pyproject.toml")


def test_image_copies_what_the_install_and_the_flows_need():
    instructions = dockerfile_instructions()
    base = next(args for instruction, args in instructions if instruction == "FROM")
    version = re.search(r"python:(\d+)\.(\d+)", base)
    assert version and (int(version[1]), int(version[2])) >= (3, 10), f"base image {base}: needs Python 3.10+"
    copied = set()
    for instruction, args in instructions:
        if instruction == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            copied.update(sources)
    for needed in ("pyproject.toml", "requirements.lock", "pipeline", "flows", "params.yaml"):
        assert needed in copied, f"infra/Dockerfile does not COPY {needed}"
    for source in copied:
        assert (REPO / source).exists(), f"infra/Dockerfile copies {source}, which is not in the repository"
    ignored = [line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert "**/.venv" in ignored  # the virtual environment (GBs) must never be sent as build context
    assert not copied & set(ignored), "a COPY source is excluded by infra/Dockerfile.dockerignore"
    workdir = [args for instruction, args in instructions if instruction == "WORKDIR"]
    assert workdir == ["/opt/pipeline"], "the compose deploy expects the code in /opt/pipeline"


# --------------------------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose():
    return load_yaml(INFRA / "docker-compose.yml")


def test_compose_has_server_database_minio_bucket_and_worker(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "create-bucket", "deploy", "worker"} <= set(services)

    server = services["prefect-server"]
    database_url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert database_url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in database_url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "server" in server["command"] and "start" in server["command"]

    bucket_command = " ".join(services["create-bucket"]["command"])
    assert "mc mb" in bucket_command
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_worker_runs_the_pipeline_image_against_the_server_and_minio(compose):
    import prefect
    from packaging.version import Version

    services = compose["services"]
    builders = [s for s in services.values() if "build" in s]
    assert builders, "no service builds the pipeline image"
    for service in builders:
        assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == \
            (INFRA / "Dockerfile").resolve()
    image = builders[0]["image"]
    assert services["worker"]["image"] == services["deploy"]["image"] == image

    server_port = services["prefect-server"]["command"][services["prefect-server"]["command"].index("--port") + 1]
    tag = services["prefect-server"]["image"].split(":")[1].split("-")[0]
    assert Version(tag) >= Version(prefect.__version__), "the server must not be older than the clients"
    for name in ("worker", "deploy"):
        env = services[name]["environment"]
        api = urlparse(env["PREFECT_API_URL"])
        assert (api.hostname, str(api.port)) == ("prefect-server", server_port), env["PREFECT_API_URL"]
        assert urlparse(env["AWS_ENDPOINT_URL"]).hostname == "minio"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        assert any(v.split(":")[1] == "/workspace" for v in services[name]["volumes"])

    worker_command = services["worker"]["command"]
    pool = worker_command[worker_command.index("--pool") + 1]
    assert worker_command[:3] == ["prefect", "worker", "start"] and "process" in worker_command

    # The deploy one-shot: its flows.scheduled arguments parse, target the worker's pool, and put the
    # registry in the bucket create-bucket makes.
    from flows.scheduled import build_parser
    from pipeline.params import load_params

    shell = services["deploy"]["command"][-1]
    cli = shlex.split(shell[shell.index("python -m flows.scheduled"):])[3:]
    args = build_parser().parse_args(cli)
    assert args.deploy and args.pool == pool and args.workspace == "/workspace"
    assert f"prefect work-pool create {pool} --type process" in shell
    params = load_params(REPO / "params.yaml", args.set)
    bucket = params.registry.uri.removeprefix("s3://").split("/")[0]
    assert params.registry.uri.startswith("s3://")
    assert f"local/{bucket}" in " ".join(services["create-bucket"]["command"])
    assert urlparse(params.registry.endpoint_url).hostname == "minio"


# ------------------------------------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="module")
def k8s():
    documents = list(yaml.safe_load_all((INFRA / "k8s" / "worker.yaml").read_text()))
    return {(d["kind"], d["metadata"]["name"]): d for d in documents if d}


@pytest.fixture(scope="module")
def job_template():
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text())


@pytest.fixture(scope="module")
def k8s_deploy():
    """The Kubernetes deployment command of infra/README.md, parsed by flows.scheduled's own parser."""
    from flows.scheduled import build_parser, job_variables_from

    text = (INFRA / "README.md").read_text()
    commands = [line.strip().rstrip("\\").strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.replace("\\\n", " ").splitlines() if "flows.scheduled --deploy" in line]
    k8s_commands = [c for c in commands if "--image" in c]
    assert len(k8s_commands) == 1, f"infra/README.md: expected one --deploy --image command, found {k8s_commands}"
    command = k8s_commands[0]
    args = build_parser().parse_args(shlex.split(command[command.index("--deploy"):], comments=True))
    return args, job_variables_from(args.job_variable)


def test_k8s_worker_manifests(k8s, k8s_deploy):
    kinds = {kind for kind, _ in k8s}
    assert {"Namespace", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
            "Deployment"} <= kinds
    namespace = next(name for kind, name in k8s if kind == "Namespace")
    assert all(d["metadata"].get("namespace") == namespace for (kind, _), d in k8s.items() if kind != "Namespace")

    worker = k8s[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    command = worker["containers"][0]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--type") + 1] == "kubernetes"
    assert k8s_deploy[0].pool == command[command.index("--pool") + 1]
    assert ("ServiceAccount", worker["serviceAccountName"]) in k8s

    rules = k8s[("Role", "prefect-worker")]["rules"]
    assert any("batch" in r["apiGroups"] and "jobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    binding = k8s[("RoleBinding", "prefect-worker")]
    assert binding["subjects"][0]["name"] == worker["serviceAccountName"]
    assert binding["roleRef"]["name"] == "prefect-worker"
    assert "PREFECT_API_URL" in k8s[("ConfigMap", "edge-yolo-pipeline")]["data"]


def test_k8s_base_job_template_resolves_and_fits_the_manifests(job_template, k8s, k8s_deploy):
    from prefect.utilities.templating import apply_values, find_placeholders

    configuration, variables = job_template["job_configuration"], job_template["variables"]["properties"]
    used = {p.name for p in find_placeholders(configuration)}
    assert used <= set(variables), f"placeholders without a variable: {used - set(variables)}"

    # What a flow run's job looks like: the defaults, plus what Prefect fills in, plus the deployment's values.
    args, job_variables = k8s_deploy
    job_variables = {**job_variables, "image": args.image}
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    values.update(name="flow-run-x", command="prefect flow-run execute", env={"PREFECT__FLOW_RUN_ID": "x"},
                  labels={"app": "edge-yolo"}, job_watch_timeout_seconds=None)
    assert set(job_variables) <= set(variables)
    values.update(job_variables)
    job = apply_values(configuration["job_manifest"], values)
    assert not find_placeholders(job), f"unresolved: {find_placeholders(job)}"

    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0  # Prefect retries, not k8s
    assert job["metadata"]["namespace"] == next(name for kind, name in k8s if kind == "Namespace")
    assert ("ServiceAccount", pod["serviceAccountName"]) in k8s
    container = pod["containers"][0]
    assert container["image"] == args.image
    assert ("ConfigMap", container["envFrom"][0]["configMapRef"]["name"]) in k8s
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in k8s
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    assert args.workspace == "/workspace"
