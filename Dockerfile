# The project's user-code image: Dagster's code server for analytics_views.definitions:defs (location
# analytics_views) on port 4000. The same image runs every run (DockerRunLauncher, K8sRunLauncher) and, with
# another command, the webserver and daemon of deploy/compose.yaml. README: "Past one machine".
#
# Pinned by tag: the digest of python:3.11-slim-bookworm could not be looked up where this was written (no
# registry reachable); pin it when you build, e.g. FROM python:3.11-slim-bookworm@sha256:<digest from
# `docker buildx imagetools inspect python:3.11-slim-bookworm`>.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 analytics \
    && useradd --system --uid 10001 --gid analytics --home-dir /home/analytics --create-home analytics

WORKDIR /opt/analytics-views
COPY . .
# Editable on purpose: the package finds sql/ and the component's state beside itself (analytics_views/paths.py),
# so the installed project is this folder. Every dependency version comes from the lock.
RUN pip install -c constraints.txt -e '.[deploy]'
# Loads the definitions once as root: a broken defs.yaml or SQL file fails the build, and the SQL parse cache
# (.cache/) is written here, read-only to the user the server runs as (whoever writes it could change the code).
RUN python -c "import analytics_views.definitions" \
    && install -d -o analytics -g analytics /opt/dagster/dagster_home /opt/dagster/dagster_home/storage

# Numeric, so Kubernetes can verify runAsNonRoot (deploy/helm/values.yaml) without a passwd lookup.
USER 10001:10001

# The code server reads its host and port from these (dagster code-server start's envvars); a run's container
# ignores them. 0.0.0.0 so the webserver, daemon and run containers reach it on the container network.
ENV DAGSTER_CODE_SERVER_HOST=0.0.0.0 \
    DAGSTER_CODE_SERVER_PORT=4000
EXPOSE 4000

# CMD, never ENTRYPOINT: DockerRunLauncher and the Helm chart start runs and code servers by passing a whole
# command (`dagster api execute_run ...`, `dagster code-server start ...`) as the container's arguments.
CMD ["dagster", "code-server", "start", "-m", "analytics_views.definitions", "-a", "defs", "--location-name", "analytics_views"]
