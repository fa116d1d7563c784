"""A run's peak memory, for sizing the pods Kubernetes starts for runs (deploy/helm/values.yaml).

    .venv/bin/python -m bench.run_memory [--users 5000] [--days 730] [--repeat 3] [--job daily]

Starts an embedded PostgreSQL, migrates and seeds a database (the project's generator, `analytics-views seed`'s
defaults), then runs `analytics-views refresh --<job> --force` --repeat times with the project's dagster.yaml.
Every 50 ms it samples the processes a run starts: the run worker (which Dagster's default run launcher spawns
from the code server; in a pod it is the container's main process), the executor's forkserver and step
processes, and each step's compute-log capture. It reports the peak of their summed RSS, of their summed PSS
(pages shared after fork counted once, nearer what a pod's memory cgroup charges), each kind of process's
largest RSS, and the CPU time they used. The code server and `dagster job launch` are not in a run pod and are
not counted. Prints one JSON document (bench/results/run_memory.daily.json holds one).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import psycopg

from analytics_views.operations.migrate import migrate
from analytics_views.operations.seed import seed
from analytics_views.operations.services import prepare_dagster_home
from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.database import libpq_url, with_database
from analytics_views.postgres.embedded import embedded_server

MB = 2**20


def is_code_server(command: str) -> bool:
    return " api grpc" in command or " code-server start" in command


def role(command: str, parent_command: str) -> str:
    if "forkserver" in command:
        return "step" if "forkserver" in parent_command else "forkserver"
    if "spawn_main" in command:
        return "run_worker"
    if "resource_tracker" in command:
        return "resource_tracker"
    return "log_capture"  # a step's `tail -F` of its compute logs and the watcher that ends it


class RunTreeSampler:
    """Peaks of the processes a run starts while `refresh` runs: everything below the code servers the
    command's `dagster job launch` started (Dagster's default run launcher spawns the run worker from the
    code server), which is what a run pod holds."""

    def __init__(self, refresh: subprocess.Popen) -> None:
        self.refresh = psutil.Process(refresh.pid)
        # Kept once seen: `dagster job launch` exits after submitting, leaving its code server to serve the run.
        self.code_servers: dict[int, psutil.Process] = {}
        self.rss_peak = 0
        self.pss_peak = 0
        self.process_peaks: dict[str, int] = {}  # role -> largest RSS of one such process
        self.most_steps = 0
        self.cpu_seconds: dict[tuple[int, float], float] = {}  # user + system time of each process, last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            below_refresh = self.refresh.children(recursive=True)
        except psutil.Error:
            below_refresh = []
        for process in below_refresh:
            try:
                if process.pid not in self.code_servers and is_code_server(" ".join(process.cmdline())):
                    self.code_servers[process.pid] = process
            except psutil.Error:
                continue
        run_processes = []
        for server in self.code_servers.values():
            try:
                run_processes += server.children(recursive=True)
            except psutil.Error:
                continue
        rss = pss = steps = 0
        for process in run_processes:
            try:
                info = process.memory_full_info()
                times = process.cpu_times()
                self.cpu_seconds[(process.pid, process.create_time())] = times.user + times.system
                kind = role(" ".join(process.cmdline()), " ".join(process.parent().cmdline()))
            except (psutil.Error, AttributeError):
                continue
            rss += info.rss
            pss += info.pss
            steps += kind == "step"
            self.process_peaks[kind] = max(self.process_peaks.get(kind, 0), info.rss)
        self.rss_peak = max(self.rss_peak, rss)
        self.pss_peak = max(self.pss_peak, pss)
        self.most_steps = max(self.most_steps, steps)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.05)

    def __enter__(self) -> "RunTreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--job", choices=("daily", "weekly", "all"), default="daily")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="analytics-views-memory-") as folder, embedded_server(
        Path(folder) / "postgres"
    ) as server:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute("CREATE DATABASE analytics")
            conn.execute("CREATE DATABASE dagster")
        analytics, storage = with_database(server, "analytics"), with_database(server, "dagster")
        migrate(analytics)
        summary = seed(analytics, users=args.users, days=args.days, seed=42)
        env = {
            **os.environ,
            "DATABASE_URL": analytics,
            "DAGSTER_POSTGRES_URL": libpq_url(storage),
            "DAGSTER_HOME": str(prepare_dagster_home(Path(folder) / "dagster_home")),
        }
        command = [str(Path(sys.executable).parent / "analytics-views"), "refresh", f"--{args.job}", "--force"]
        runs = []
        for _ in range(args.repeat):
            started = time.monotonic()
            refresh = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            with RunTreeSampler(refresh) as sampler:
                stdout, stderr = refresh.communicate()
            if refresh.returncode != 0:
                print(stdout, stderr, file=sys.stderr)
                return 1
            runs.append({
                "seconds": round(time.monotonic() - started, 1),
                "run_tree_rss_peak_mb": round(sampler.rss_peak / MB, 1),
                "run_tree_pss_peak_mb": round(sampler.pss_peak / MB, 1),
                # At least: a process's time after its last sample is missed.
                "run_tree_cpu_seconds": round(sum(sampler.cpu_seconds.values()), 1),
                "most_step_processes_at_once": sampler.most_steps,
                "largest_process_rss_mb": {kind: round(size / MB, 1) for kind, size in sorted(sampler.process_peaks.items())},
                "outcomes": stdout.splitlines(),
            })
    print(json.dumps({
        "job": args.job,
        "data": {"users": summary.users, "events": summary.events, "days": args.days},
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "runs": runs,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
