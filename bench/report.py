"""The results as the printed table, Markdown tables (docs/benchmarks.md) and a chart."""

from pathlib import Path


def ratio(value: float, floor: float) -> float:
    return round(value / floor, 2) if floor > 0 else float("nan")


def report(results: dict) -> str:
    lines = [
        f"size {results['size']}: {results['counts']}; PostgreSQL {results['server']['server_version']}, "
        f"{results['machine']['cpus']} cores, load average {results['machine'].get('load_average', '?')} at the start",
    ]
    if "views" in results:  # not with --jobs-only
        lines += view_report(results)
    return "\n".join(lines + job_report(results))


def view_report(results: dict) -> list[str]:
    lines = [
        "",
        "view                   rows     query  window  plain  concur  swap   asset  | x window: plain concur swap asset"
        " | readers p99/max ms: plain, concurrent, swap | 2x history plain",
    ]
    skipped_lines = ["", "asset materialization when no source changed since the last refresh, then after a write:"]
    for name, view in results["views"].items():
        t = view["times_s"]
        floor = t["window_read"]
        asset = results["assets"][name]
        if name in results.get("skips", {}):
            skip = results["skips"][name]
            skipped_lines.append(
                f"{name:22s} unchanged: {skip['unchanged']['mode']} in {skip['unchanged']['wall_s']:.3f} s;"
                f" after a source write: {skip['after_a_source_write']['mode']}"
                f" in {skip['after_a_source_write']['wall_s']:.3f} s (concurrent refresh alone {t['concurrent']:.3f} s)"
            )
        r = view["readers"]
        doubled = results.get("doubled_history", {}).get(name, {})
        lines.append(
            f"{name:22s} {view['rows']:>8} {t['query']:6.3f} {floor:6.3f} {t['plain']:6.3f} {t['concurrent']:6.3f} "
            f"{t['swap']:6.3f} {asset['wall_s']:6.3f} | {ratio(t['plain'], floor):6} {ratio(t['concurrent'], floor):6} "
            f"{ratio(t['swap'], floor):5} {ratio(asset['wall_s'], floor):5} | "
            + ", ".join(f"{r[k]['p99_ms']:.0f}/{r[k]['max_ms']:.0f}" for k in ("plain", "concurrent", "swap"))
            + (f" | {doubled.get('plain_change_pct', float('nan')):+.1f}%" if doubled else "")
            + (f", blocks {doubled['query_blocks_before']} -> {doubled['query_blocks']}" if "query_blocks" in doubled else "")
        )
    for name, view in results["views"].items():
        t = view["times_s"]
        if "window_read_and_lookups" in t:
            lines.append(
                f"{name:22s} window read and the lookups it cannot avoid {t['window_read_and_lookups']:.3f} s:"
                f" CONCURRENTLY {ratio(t['concurrent'], t['window_read_and_lookups'])}x that"
            )
    lines += ["", "asset materialization in process against REFRESH CONCURRENTLY, the two alternated (medians):"]
    for name, asset in results["assets"].items():
        lines.append(
            f"{name:22s} asset {asset['wall_s']:.3f} s ({asset['mode']}), CONCURRENTLY {asset['concurrent_alongside_s']:.3f} s:"
            f" overhead {asset['overhead_s']:+.3f} s, allowed {asset['allowed_overhead_s']:.3f} s (5% + 0.3 s)"
        )
    if len(skipped_lines) > 2:
        lines += skipped_lines
    return lines


def job_report(results: dict) -> list[str]:
    lines = []
    jobs = results.get("jobs")
    if jobs:
        lines += ["", "job wall times (submit -> SUCCESS, median):"]
        for job, old in jobs["old_way"].items():
            lines.append(f"  {job}: old way (one connection, one view after another) {old:.3f} s")
            for label, variant in jobs["variants"].items():
                j = variant["jobs"][job]
                lines.append(
                    f"    {label:60s} {j['wall_s']:6.2f} s, launch cost {j['launch_cost_s']:.2f} s;"
                    f" pair by pair {j['beyond_launch_s']:+.2f} s over it,"
                    f" slowest view {j['slowest_view_s']:.3f} s:"
                    f" {j['over_target_s']:+.2f} s over the target (all views {j['sum_of_views_s']:.3f} s;"
                    f" queued {j['submit_to_worker_start_s']:.2f} s)"
                )
        lines.append(f"  memory (sum of RSS of webserver, daemon and children, MB): {jobs['memory_mb']}")
    return lines


def markdown(results: dict) -> str:
    """The figures as Markdown tables, for docs/benchmarks.md."""
    out = view_tables(results) if "views" in results else []  # not with --jobs-only
    jobs = job_tables(results)
    return "\n".join(out + (jobs[1:] if jobs and not out else jobs))


def view_tables(results: dict) -> list[str]:
    out = [
        "| view | rows | window read (floor) | query alone | plain REFRESH | CONCURRENTLY | build-and-swap "
        "| asset (mode) | x floor: plain / concurrent / swap / asset | readers p99 / max ms: none, plain, "
        "concurrent, swap | 2x history: plain, window read |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for name, view in results["views"].items():
        t, r, asset = view["times_s"], view["readers"], results["assets"][name]
        floor = t["window_read"]
        doubled = results.get("doubled_history", {}).get(name)
        out.append(
            f"| `{name}` | {view['rows']:,} | {floor:.3f} s | {t['query']:.3f} s | {t['plain']:.3f} s "
            f"| {t['concurrent']:.3f} s | {t['swap']:.3f} s | {asset['wall_s']:.3f} s ({asset['mode']}) "
            f"| {ratio(t['plain'], floor)} / {ratio(t['concurrent'], floor)} / {ratio(t['swap'], floor)} "
            f"/ {ratio(asset['wall_s'], floor)} | "
            + ", ".join(f"{r[k]['p99_ms']:.0f} / {r[k]['max_ms']:.0f}" for k in ("none", "plain", "concurrent", "swap"))
            + (f" | {doubled['plain_change_pct']:+.0f}%, {doubled['window_read_change_pct']:+.0f}% |" if doubled else " | |")
        )
    lookups = {name: v["times_s"] for name, v in results["views"].items() if "window_read_and_lookups" in v["times_s"]}
    if lookups:
        out += ["", "| view | window read | window read and the lookups it cannot avoid | CONCURRENTLY | x each |",
                "|---|---:|---:|---:|---|"]
        out += [
            f"| `{name}` | {t['window_read']:.3f} s | {t['window_read_and_lookups']:.3f} s | {t['concurrent']:.3f} s "
            f"| {ratio(t['concurrent'], t['window_read'])} / {ratio(t['concurrent'], t['window_read_and_lookups'])} |"
            for name, t in lookups.items()
        ]
    out += [
        "",
        "| view | asset (in process) | CONCURRENTLY, alternated with it | overhead | allowed (5% + 0.3 s) |",
        "|---|---:|---:|---:|---:|",
    ]
    out += [
        f"| `{name}` | {a['wall_s']:.3f} s ({a['mode']}) | {a['concurrent_alongside_s']:.3f} s "
        f"| {a['overhead_s']:+.3f} s | {a['allowed_overhead_s']:.3f} s |"
        for name, a in results["assets"].items()
    ]
    return out


def job_tables(results: dict) -> list[str]:
    out = []
    jobs = results.get("jobs")
    if jobs:
        out += [
            "",
            "| job | way | runs | wall (submit -> SUCCESS) | launch cost (run with nothing to refresh) "
            "| run - launch cost, pair by pair | slowest view | over the target (pair by pair) | all views "
            "| queued (until the run worker starts) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for job, old in jobs["old_way"].items():
            out.append(f"| `{job}` | old way: one connection, views one after another | | {old:.2f} s | | | | | | |")
            for label, variant in jobs["variants"].items():
                j = variant["jobs"][job]
                out.append(
                    f"| `{job}` | {label} | {len(j['runs'])} | {j['wall_s']:.2f} s | {j['launch_cost_s']:.2f} s "
                    f"| {j['beyond_launch_s']:.2f} s | {j['slowest_view_s']:.2f} s | {j['over_target_s']:+.2f} s "
                    f"| {j['sum_of_views_s']:.2f} s | {j['submit_to_worker_start_s']:.2f} s |"
                )
        if any("runs_peak" in m for m in jobs["memory_mb"].values()):
            out += [
                "",
                "| Dagster processes (sum of RSS, MB) | idle (webserver, daemon, their code servers) | peak during "
                "the variant's runs | of which the runs' own processes (run worker, step processes), peak |",
                "|---|---:|---:|---:|",
            ]
            out += [
                f"| {label} | {m['idle']} | {m['peak']} | {m.get('runs_peak', '')} |"
                for label, m in jobs["memory_mb"].items()
            ]
        else:
            out += ["", "| Dagster processes (sum of RSS, MB) | idle | peak during runs |", "|---|---:|---:|"]
            out += [f"| {label} | {m['idle']} | {m['peak']} |" for label, m in jobs["memory_mb"].items()]
    return out


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "views" not in results:  # --jobs-only: the jobs' panel alone
        fig, right = plt.subplots(figsize=(12, 6))
        job_chart(results, right)
        finish_chart(fig, results, path, whole_labels=True)
        return
    names = list(results["views"])
    kinds = [("window_read", "window read (floor)"), ("query", "query alone"), ("plain", "REFRESH"),
             ("concurrent", "REFRESH CONCURRENTLY"), ("swap", "build-and-swap"), ("asset", "asset (auto)")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(kinds)
    for i, (key, label) in enumerate(kinds):
        values = [
            results["assets"][n]["wall_s"] if key == "asset" else results["views"][n]["times_s"][key] for n in names
        ]
        left.bar([x + i * width for x in range(len(names))], values, width, label=label)
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(names))])
    left.set_xticklabels([n.replace("_", "\n", 1) for n in names], fontsize=8)
    left.set_ylabel("seconds (median)")
    left.set_title(f"Refresh of each view, {results['size']} size")
    left.legend(fontsize=8)
    job_chart(results, right)
    finish_chart(fig, results, path)


def job_chart(results: dict, right) -> None:
    jobs = results.get("jobs")
    if jobs:
        labels, walls = [], []
        for job, old in jobs["old_way"].items():
            labels.append(f"{job}\nold way")
            walls.append(old)
            for label, variant in jobs["variants"].items():
                labels.append(f"{job}\n{label}")
                walls.append(variant["jobs"][job]["wall_s"])
        right.barh(range(len(labels)), walls)
        right.set_yticks(range(len(labels)))
        right.set_yticklabels(labels, fontsize=6)
        right.invert_yaxis()
        right.set_xlabel("seconds, submit -> SUCCESS (median)")
        right.set_title("Job runs launched by the daemon")


def finish_chart(fig, results: dict, path: Path, whole_labels: bool = False) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(f"PostgreSQL {results['server']['server_version']}, {results['machine']['cpus']} cores",
                 fontsize=9)
    fig.tight_layout()
    # whole_labels: the jobs' long labels alone on the left, which tight_layout cuts.
    fig.savefig(path, dpi=110, bbox_inches="tight" if whole_labels else None)
    plt.close(fig)
