"""What Kubernetes gives a run, from deploy/helm/values.yaml as Dagster's chart renders it and dagster-k8s 0.29.27
merges it. No helm binary or cluster here: the chart's templates that feed the run launcher and the instance are
transcribed below (each cites its template in dagster-io/dagster's helm/dagster), and dagster-k8s' own launcher
and job builder do the rest."""

import json
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml
from dagster_k8s import DagsterK8sJobConfig, K8sRunLauncher, construct_dagster_k8s_job

from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.database import libpq_url
from analytics_views_tests.deploy.test_deployment import DOCKER_DAGSTER_YAML, HELM_VALUES, load_yaml

RELEASE = "dagster"  # `helm upgrade --install dagster dagster/dagster` (docs/deployment.md): the chart's full name is the release's
NAMESPACE = "analytics"
DAGSTER_HOME = "/opt/dagster/dagster_home"  # the chart's global.dagsterHome default
RUN_MEMORY = PROJECT_ROOT / "bench" / "results" / "run_memory.daily.json"
MiB = 2**20


def quantity_bytes(quantity: str) -> int:
    number, unit = (quantity[:-2], quantity[-2:]) if quantity[-2:] in ("Mi", "Gi") else (quantity, "")
    return int(float(number) * {"Mi": MiB, "Gi": 1024 * MiB, "": 1}[unit])


def names(entries: list[dict]) -> list[str]:
    return [entry["name"] for entry in entries if "name" in entry]


def chart_run_launcher_config(values: dict, kubeconfig: str) -> dict:
    """The K8sRunLauncher config the chart writes into the instance's dagster.yaml (templates/helpers/instance/
    _run-launcher.tpl, `dagsterYaml.runLauncher.k8s`), with a kubeconfig file for the in-cluster config."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    config = {
        "load_incluster_config": False,
        "kubeconfig_file": kubeconfig,
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE,
        "service_account_name": RELEASE,
        "dagster_home": DAGSTER_HOME,
        "instance_config_map": f"{RELEASE}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "image_pull_secrets": values.get("imagePullSecrets") or None,
        "env_config_maps": names(k8s.get("envConfigMaps", [])) or None,
        "env_secrets": names(k8s.get("envSecrets", [])) or None,
        "resources": k8s.get("resources"),
        "security_context": k8s.get("securityContext"),
    }
    return {key: value for key, value in config.items() if value is not None}


def chart_code_location_context(values: dict) -> dict | None:
    """The container context the chart hands the code server (DAGSTER_CONTAINER_CONTEXT), which it puts in each
    run's origin: only with includeConfigInLaunchedRuns (charts/dagster-user-deployments/templates/
    deployment-user.yaml and helpers/_helpers.tpl, `dagsterUserDeployments.k8sContainerContext`)."""
    subchart = values["dagster-user-deployments"]
    (deployment,) = subchart["deployments"]
    if not deployment.get("includeConfigInLaunchedRuns", {"enabled": True})["enabled"]:
        return None
    k8s = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"{RELEASE}-{deployment['name']}-user-env", *names(deployment.get("envConfigMaps", []))],
        "env_secrets": names(deployment.get("envSecrets", [])),
        "namespace": NAMESPACE,
        "service_account_name": f"{RELEASE}-dagster-user-deployments",
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
    }
    if subchart.get("imagePullSecrets"):
        k8s["image_pull_secrets"] = subchart["imagePullSecrets"]
    if deployment.get("resources"):
        k8s["resources"] = deployment["resources"]
    return {"k8s": k8s}


@pytest.fixture
def kubeconfig(tmp_path) -> str:
    """A kubeconfig naming a cluster nobody listens on: the launcher loads it and builds no connection."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "none", "user": {"token": "none"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
    }))
    return str(path)


def run_pod_container(values: dict, kubeconfig: str):
    """The run worker's pod spec and container for a daily run, as K8sRunLauncher builds them."""
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    launcher = K8sRunLauncher(**chart_run_launcher_config(values, kubeconfig))
    # A DagsterRun's origin classes are not public API: this run has only what dagster-k8s reads from one
    # (dagster_k8s/container_context.py, K8sContainerContext.create_for_run): the code location's container
    # context, and the job's tags, which it merges last.
    run = SimpleNamespace(
        job_code_origin=SimpleNamespace(repository_origin=SimpleNamespace(container_context=chart_code_location_context(values))),
        tags={"cadence": "daily"},
    )
    context = launcher.get_container_context_for_run(run)
    # As K8sRunLauncher._launch_k8s_job_with_args (dagster_k8s/launcher.py) builds the run's Job.
    job = construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(
            job_image=image, dagster_home=launcher.dagster_home, instance_config_map=launcher.instance_config_map,
            postgres_password_secret=launcher.postgres_password_secret,
        ),
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-test",
        pod_name="dagster-run-test",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
    )
    pod = job.spec.template.spec
    (container,) = pod.containers
    return pod, container


def test_run_pod_gets_the_run_launchers_resources_after_dagster_k8s_merge(kubeconfig):
    values = load_yaml(HELM_VALUES)
    pod, container = run_pod_container(values, kubeconfig)
    assert container.resources.requests == {"cpu": "250m", "memory": "384Mi"}
    assert container.resources.limits == {"memory": "1Gi"}
    assert container.image == "registry.example.com/analytics-views:0.1.0"
    assert (container.security_context.run_as_user, container.security_context.run_as_non_root,
            container.security_context.allow_privilege_escalation) == (10001, True, False)
    assert [source.secret_ref.name for source in container.env_from if source.secret_ref] == ["analytics-views-database"]
    assert [secret.name for secret in pod.image_pull_secrets] == ["analytics-views-registry"]
    # Not the code server's: its pod keeps its own, smaller figures.
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}


def test_code_server_pulls_and_runs_as_locked_down_as_a_run_pod(kubeconfig):
    values = load_yaml(HELM_VALUES)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    _, container = run_pod_container(values, kubeconfig)
    run_pod = container.security_context
    assert deployment["securityContext"] == {
        "runAsNonRoot": run_pod.run_as_non_root, "runAsUser": run_pod.run_as_user,
        "allowPrivilegeEscalation": run_pod.allow_privilege_escalation,
    }
    # The subchart reads only its own list (only `global` reaches a subchart).
    assert values["dagster-user-deployments"]["imagePullSecrets"] == values["imagePullSecrets"] == [
        {"name": "analytics-views-registry"}
    ]


def test_code_servers_resources_win_when_its_config_is_included_in_runs(kubeconfig):
    """What issue 24 found, reproduced by the same merge: why includeConfigInLaunchedRuns is off."""
    values = load_yaml(HELM_VALUES)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    deployment["includeConfigInLaunchedRuns"]["enabled"] = True
    _, container = run_pod_container(values, kubeconfig)
    assert container.resources.requests == {"cpu": "250m", "memory": "512Mi"}
    assert container.resources.limits == {"memory": "1Gi"}


def test_run_pod_memory_covers_the_measured_run_twice_over():
    """The values' comment's figures, from the measurement it cites (bench/run_memory.py): a run is one process
    (its step refreshes the views over threads) with its log capture; the request covers twice its peak."""
    measured = json.loads(RUN_MEMORY.read_text())
    run = max(measured["runs"], key=lambda run: run["run_tree_rss_peak_mb"])
    assert run["most_step_processes_at_once"] == 0  # no process per step any more
    assert round(run["run_tree_rss_peak_mb"]) == 173
    resources = load_yaml(HELM_VALUES)["runLauncher"]["config"]["k8sRunLauncher"]["resources"]
    assert quantity_bytes(resources["requests"]["memory"]) >= 2 * run["run_tree_rss_peak_mb"] * MiB
    assert quantity_bytes(resources["limits"]["memory"]) >= 2 * quantity_bytes(resources["requests"]["memory"])


def chart_instance_yaml(values: dict, kubeconfig: str) -> dict:
    """The instance settings the chart renders (templates/configmap-instance.yaml with helpers/instance/
    _run-coordinator.tpl and _concurrency.tpl) that decide when runs start and end: the run coordinator (the
    daemon's `runCoordinator` left at the chart's default, QueuedRunCoordinator with no config), pools and run
    monitoring, with the run launcher above (resuming a run needs one that can). Storage is the Compose
    deployment's form of the same PostgreSQL storage."""
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    pools = values["concurrency"]["pools"]
    return {
        "storage": {"postgres": {"postgres_url": {"env": "DAGSTER_POSTGRES_URL"}}},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher",
                         "config": chart_run_launcher_config(values, kubeconfig)},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"},
        "concurrency": {"pools": {"default_limit": pools["defaultLimit"], "granularity": pools["granularity"]}},
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "cancel_timeout_seconds": monitoring["cancelTimeoutSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
            "max_runtime_seconds": monitoring["maxRuntimeSeconds"],  # since dagster-io/dagster#27005
        },
        "telemetry": values["telemetry"],
    }


def test_helm_instance_fails_a_run_after_compose_time_limit_and_queues_runs_whose_views_are_busy(
    empty_db, kubeconfig, tmp_path, monkeypatch
):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(chart_instance_yaml(load_yaml(HELM_VALUES), kubeconfig)))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", libpq_url(empty_db))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        compose_limit = load_yaml(DOCKER_DAGSTER_YAML)["run_monitoring"]["max_runtime_seconds"]
        assert instance.run_monitoring_max_runtime_seconds == compose_limit == 7200
        assert instance.run_monitoring_max_resume_run_attempts == 1
        assert isinstance(instance.run_launcher, K8sRunLauncher)
        pools = instance.get_concurrency_config().pool_config
        assert (pools.default_pool_limit, pools.pool_granularity.value) == (1, "op")
        # The queue: at most 10 runs in progress; a run whose first steps' pools are all taken stays queued.
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, dg.QueuedRunCoordinator)
        queue = coordinator.get_run_queue_config()
        assert (queue.max_concurrent_runs, queue.tag_concurrency_limits) == (10, [])
        assert (queue.should_block_op_concurrency_limited_runs, queue.op_concurrency_slot_buffer) == (True, 0)
