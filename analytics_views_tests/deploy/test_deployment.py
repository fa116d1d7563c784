"""Dagster's own deployments (docs/deployment.md), checked without a Docker daemon, registry or cluster:
the Compose deployment's instance loads and launches runs in containers, compose.yaml agrees with it and with
the image, the image's command serves the definitions, and the Helm values use only keys the chart defines."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import jsonschema
import pytest
import yaml
from dagster_docker import DockerRunLauncher

from analytics_views.operations.services import DAGSTER_YAML, prepare_dagster_home, stop_processes
from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.database import libpq_url
from analytics_views_tests.conftest import free_port

DEPLOY = PROJECT_ROOT / "deploy"
DOCKER_DAGSTER_YAML = DEPLOY / "docker" / "dagster.yaml"
DOCKER_WORKSPACE = DEPLOY / "docker" / "workspace.yaml"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
HELM_KEYS_SCHEMA = DEPLOY / "helm" / "values-keys.schema.json"
VENV_BIN = Path(sys.executable).parent


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    logical = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in logical.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [arguments for instruction, arguments in dockerfile_instructions() if instruction == keyword]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for arguments in dockerfile_values("ENV"):
        env.update(pair.split("=", 1) for pair in arguments.split())
    return env


def dockerfile_cmd() -> list[str]:
    (cmd,) = dockerfile_values("CMD")
    return json.loads(cmd)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def compose_env(service: dict) -> dict[str, str]:
    return service.get("environment", {})


# --- the Compose deployment's instance -------------------------------------------------------------------


@pytest.fixture
def compose_instance(empty_db, tmp_path, monkeypatch) -> dg.DagsterInstance:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").symlink_to(DOCKER_DAGSTER_YAML)
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", libpq_url(empty_db))
    monkeypatch.setenv("DATABASE_URL", empty_db)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def test_compose_instance_launches_each_run_in_a_container_on_the_compose_network(compose_instance):
    launcher = compose_instance.run_launcher
    assert isinstance(launcher, DockerRunLauncher)
    assert launcher.env_vars == ["DATABASE_URL", "DAGSTER_POSTGRES_URL"]
    assert launcher.networks == ["analytics_views"]
    assert launcher.container_kwargs == {
        "volumes": ["analytics_views_dagster_storage:/opt/dagster/dagster_home/storage"]
    }
    # What allows resuming: the daemon can tell a dead run container from a running one.
    assert (launcher.supports_check_run_worker_health, launcher.supports_resume_run) == (True, True)
    assert type(compose_instance.run_storage).__name__ == "PostgresRunStorage"


def test_compose_instance_keeps_one_refresh_per_view_and_resumes_a_run_whose_container_died(compose_instance):
    pools = compose_instance.get_concurrency_config().pool_config
    assert (pools.default_pool_limit, pools.pool_granularity.value) == (1, "op")
    assert compose_instance.run_monitoring_enabled is True
    assert compose_instance.run_monitoring_max_resume_run_attempts == 1
    assert compose_instance.run_monitoring_max_runtime_seconds == 7200
    assert compose_instance.run_monitoring_poll_interval_seconds == 15
    assert compose_instance.get_settings("telemetry") == {"enabled": False}


def test_compose_instance_differs_from_the_single_host_one_only_in_launcher_and_resume():
    single_host, compose = load_yaml(DAGSTER_YAML), load_yaml(DOCKER_DAGSTER_YAML)
    assert "run_launcher" not in single_host
    assert compose.pop("run_launcher")["class"] == "DockerRunLauncher"
    assert (single_host["run_monitoring"].pop("max_resume_run_attempts"),
            compose["run_monitoring"].pop("max_resume_run_attempts")) == (0, 1)
    assert compose == single_host


def test_single_host_instance_still_loads_with_the_deploy_extra_installed(empty_db, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", libpq_url(empty_db))
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(tmp_path / "home"))) as instance:
        assert type(instance.run_launcher) is dg.DefaultRunLauncher
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_monitoring_max_resume_run_attempts == 0


# --- compose.yaml ------------------------------------------------------------------------------------------


def test_compose_runs_webserver_daemon_and_code_server_apart_beside_postgres():
    services = load_yaml(COMPOSE)["services"]
    assert set(services) == {"postgres", "user-code", "webserver", "daemon"}
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    # The webserver and daemon load what the code server serves: the workspace the compose file mounts.
    for name in ("webserver", "daemon"):
        assert option(services[name]["command"], "-w") == "/opt/dagster/dagster_home/workspace.yaml"
        assert "./docker/workspace.yaml:/opt/dagster/dagster_home/workspace.yaml:ro" in services[name]["volumes"]
        assert "./docker/dagster.yaml:/opt/dagster/dagster_home/dagster.yaml:ro" in services[name]["volumes"]
        assert compose_env(services[name])["DAGSTER_HOME"] == "/opt/dagster/dagster_home"


def test_compose_code_service_serves_what_the_workspace_loads_and_runs_use_its_image():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    code = services["user-code"]
    (server,) = [entry["grpc_server"] for entry in load_yaml(DOCKER_WORKSPACE)["load_from"]]
    # No command of its own: the image's CMD, on the port the image's environment sets.
    assert "command" not in code and "entrypoint" not in code
    assert server == {
        "host": "user-code",
        "port": int(dockerfile_env()["DAGSTER_CODE_SERVER_PORT"]),
        "location_name": option(dockerfile_cmd(), "--location-name"),
    }
    assert code["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    image = code["image"]
    assert compose_env(code)["DAGSTER_CONTAINER_IMAGE"] == image
    assert {services[name]["image"] for name in ("webserver", "daemon")} == {image}
    launcher = load_yaml(DOCKER_DAGSTER_YAML)["run_launcher"]["config"]
    assert compose["networks"]["analytics_views"]["name"] == launcher["network"]
    volume = launcher["container_kwargs"]["volumes"][0].split(":")[0]
    assert compose["volumes"]["dagster_storage"]["name"] == volume


def test_compose_publishes_only_the_ui_and_only_on_loopback():
    services = load_yaml(COMPOSE)["services"]
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert published == {"webserver": ["127.0.0.1:3000:3000"]}


def test_compose_and_its_env_example_hold_no_password():
    secrets = {}
    for name, service in load_yaml(COMPOSE)["services"].items():
        for key, value in compose_env(service).items():
            for secret in re.findall(r"://[^:/@\s]+:(\$\{[^}]*\}|[^@\s]+)@", value) + ([value] if "PASSWORD" in key else []):
                secrets[(name, key)] = secret
    # Each one is the environment's (deploy/.env), with compose refusing to start without it.
    assert secrets == {
        ("postgres", "POSTGRES_PASSWORD"): "${DAGSTER_PG_PASSWORD:?set DAGSTER_PG_PASSWORD in deploy/.env}",
        ("webserver", "DAGSTER_POSTGRES_URL"): "${DAGSTER_PG_PASSWORD:?set DAGSTER_PG_PASSWORD in deploy/.env}",
        ("daemon", "DAGSTER_POSTGRES_URL"): "${DAGSTER_PG_PASSWORD:?set DAGSTER_PG_PASSWORD in deploy/.env}",
        ("user-code", "SMTP_PASSWORD"): "${SMTP_PASSWORD:-}",  # only when email notifications are configured
    }
    example = (DEPLOY / ".env.example").read_text()
    assert re.findall(r"PASSWORD=(\S+)", example) == ["change-me-hex-only"]
    assert re.findall(r"://[^:/@\s]+:([^@\s]+)@", example) == ["change-me"]
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=PROJECT_ROOT)
    assert ignored.returncode == 0


# --- the image --------------------------------------------------------------------------------------------


def test_dockerfile_pins_its_base_installs_from_the_lock_and_runs_as_a_user():
    assert dockerfile_values("FROM") == ["python:3.11-slim-bookworm"]
    assert dockerfile_values("USER") == ["10001:10001"]
    assert "pip install -c constraints.txt -e '.[deploy]'" in dockerfile_values("RUN")
    # Run launchers pass a whole command as the container's arguments: an ENTRYPOINT would swallow it.
    assert dockerfile_values("ENTRYPOINT") == []
    assert dockerfile_cmd() == [
        "dagster", "code-server", "start", "-m", "analytics_views.definitions", "-a", "defs",
        "--location-name", "analytics_views",
    ]
    assert dockerfile_env()["DAGSTER_CODE_SERVER_HOST"] == "0.0.0.0"


def test_dockerignore_keeps_local_state_out_and_the_discovery_state_in():
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line for line in lines if line and not line.startswith("#")]
    assert {".venv", ".dev", ".git", "test-artifacts", "bench", "**/__pycache__", "deploy/.env"} <= set(ignored)
    assert not [pattern for pattern in ignored if "local_defs_state" in pattern]


def wait_for_code_server(process: subprocess.Popen, port: int, env: dict, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    health_check = [str(VENV_BIN / "dagster"), "api", "grpc-health-check", "-h", "127.0.0.1", "-p", str(port)]
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the code server exited with status {process.returncode}"
        if subprocess.run(health_check, env=env, capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"the code server did not answer on 127.0.0.1:{port} within {timeout_s:.0f} s")


def test_image_command_serves_the_refresh_jobs_under_the_workspace_location(tmp_path):
    port = free_port()
    env = {**os.environ, **dockerfile_env()}
    # Outside a container: loopback and a free port instead of 0.0.0.0:4000; the venv's dagster on PATH.
    env.update(DAGSTER_CODE_SERVER_HOST="127.0.0.1", DAGSTER_CODE_SERVER_PORT=str(port))
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    env.pop("DAGSTER_HOME", None)
    server = load_yaml(DOCKER_WORKSPACE)["load_from"][0]["grpc_server"]
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {**server, "host": "127.0.0.1", "port": port}}]}))
    log = tmp_path / "code-server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            dockerfile_cmd(), cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_code_server(process, port, env)
        listed = subprocess.run(
            [str(VENV_BIN / "dagster"), "job", "list", "-w", str(workspace)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
        assert listed.returncode == 0, listed.stderr
        jobs = set(re.findall(r"^Job: (\S+)$", listed.stdout, re.MULTILINE))
        assert {"daily_refresh_job", "weekly_refresh_job"} <= jobs, listed.stdout
    finally:
        stop_processes([process])
    assert process.poll() is not None


# --- the Helm values ---------------------------------------------------------------------------------------


def helm_key_errors(values: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(HELM_KEYS_SCHEMA.read_text()))
    return sorted(f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(values))


def test_helm_values_set_only_keys_the_chart_defines():
    jsonschema.Draft7Validator.check_schema(json.loads(HELM_KEYS_SCHEMA.read_text()))
    assert helm_key_errors(load_yaml(HELM_VALUES)) == []


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ((), "concurrencyPools"),
        (("dagsterDaemon", "runMonitoring"), "maxRuntimeSecond"),
        (("concurrency", "pools"), "default_limit"),
        (("runLauncher", "config", "k8sRunLauncher"), "env_secrets"),
        (("dagster-user-deployments", "deployments", 0), "codeServerArg"),
    ],
)
def test_helm_key_check_refuses_a_key_the_chart_does_not_define(path, key):
    values = load_yaml(HELM_VALUES)
    node = values
    for part in path:
        node = node[part]
    node[key] = 1
    assert helm_key_errors(values) == [
        f"{'.'.join(map(str, path))}: Additional properties are not allowed ('{key}' was unexpected)"
    ]


def test_helm_values_run_the_image_as_the_compose_deployment_does():
    values = load_yaml(HELM_VALUES)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    # The chart prepends `dagster code-server start -h 0.0.0.0 -p <port>`: the rest is the image's CMD.
    assert ["dagster", "code-server", "start", *deployment["codeServerArgs"]] == dockerfile_cmd()
    assert deployment["port"] == int(dockerfile_env()["DAGSTER_CODE_SERVER_PORT"])
    user, group = dockerfile_values("USER")[0].split(":")
    assert (deployment["podSecurityContext"]["runAsUser"], deployment["podSecurityContext"]["runAsGroup"]) == (
        int(user), int(group))
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    assert launcher["config"]["k8sRunLauncher"]["securityContext"]["runAsUser"] == int(user)
    assert deployment["envSecrets"] == launcher["config"]["k8sRunLauncher"]["envSecrets"] == [
        {"name": "analytics-views-database"}
    ]
    assert values["concurrency"] == {"enabled": True, "pools": {"defaultLimit": 1, "granularity": "op"}}
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    assert (values["postgresql"]["enabled"], values["generatePostgresqlPasswordSecret"]) == (False, False)
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["telemetry"] == {"enabled": False}
