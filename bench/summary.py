"""bench/REPORT.md from one bench/run.sh: every goal, its figure, met or not.

The drivers leave their headline figures as JSON in the run's work
directory (compare.json, lifecycle.json, lock.json, backup.json); this puts
them against the goals, with the machine, the date and the command, then
appends bench/NOTES.md (how to read the figures, the release profile
measured, what was changed where a goal was missed).

Usage: python3 bench/summary.py --work DIR --agent BIN --command CMD --out FILE
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def machine():
    model = "unknown CPU"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    kernel = pathlib.Path("/proc/sys/kernel/osrelease").read_text().strip()
    return (
        f"{model}, {os.cpu_count()} cores available, {mem_kib / 1024 / 1024:.1f} GiB RAM, "
        f"Linux {kernel}"
    )


def load(work, name):
    path = pathlib.Path(work) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def like_for_like(c, path):
    """The ratio against the agent without its no-op kubeadm runs, if measured."""
    value = c.get(f"{path}_ratio_like_for_like_p50")
    return "" if value is None else f"; without the no-op kubeadm {value}×"


def row(goal, target, figure, met, where):
    if figure is None:
        return f"| {goal} | {target} | not measured | – | {where} |"
    verdict = "–" if met is None else ("yes" if met else "**no**")
    return f"| {goal} | {target} | {figure} | {verdict} | {where} |"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--agent", required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    c, lc, lk, b = (load(a.work, n) for n in ("compare", "lifecycle", "lock", "backup"))
    source = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    agent = pathlib.Path(a.agent)
    shown = agent.relative_to(ROOT) if agent.is_relative_to(ROOT) else agent

    rows = []
    if "init_ratio_p50" in c:
        rows.append(row(
            "init path, reference ÷ agent (p50 of per-pair ratios)", "≥ 30×",
            f"{c['init_ratio_p50']}× ({c['init_reference_p50_ms']:.0f} ms ÷ "
            f"{c['init_agent_p50_ms']:.0f} ms at p50){like_for_like(c, 'init')}",
            c["init_ratio_p50"] >= 30, "compare/"))
        rows.append(row(
            "worker path, reference ÷ agent", "≥ 50×",
            f"{c['worker_ratio_p50']}× ({c['worker_reference_p50_ms']:.0f} ms ÷ "
            f"{c['worker_agent_p50_ms']:.0f} ms){like_for_like(c, 'worker')}",
            c["worker_ratio_p50"] >= 50, "compare/"))
        rows.append(row(
            "AWS calls per worker join (most in any run)", "≤ 4",
            str(c["worker_calls_max"]), c["worker_calls_max"] <= 4, "compare/"))
    storms = sorted(int(k.split("_")[1]) for k in c if k.startswith("storm_") and k.endswith("_failures"))
    for n in storms:
        rows.append(row(
            f"join storm of {n}: failures", "0" if n == 300 else "(0)",
            str(c[f"storm_{n}_failures"]), c[f"storm_{n}_failures"] == 0, "compare/"))
        rows.append(row(
            f"join storm of {n}: AWS calls per node", "≤ 4",
            f"{c[f'storm_{n}_calls_per_node']:.2f} (last node done at "
            f"{c[f'storm_{n}_last_ms'] / 1000:.1f} s)",
            c[f"storm_{n}_calls_per_node"] <= 4, "compare/"))
    if "takeover_max_over_lease" in lk:
        rows.append(row(
            "lock takeover after a crash, worst ÷ lease", "≤ 1.2",
            f"{lk['takeover_max_over_lease']:.3f}", lk["takeover_max_over_lease"] <= 1.2, "lock/"))
    if "live_completed_max_ms" in lc:
        rows.append(row(
            "termination event → member removed and action completed, worst", "≤ 5 s",
            f"{lc['live_completed_max_ms'] / 1000:.2f} s", lc["live_completed_max_ms"] <= 5000,
            "lifecycle/"))
    if "failover_completed_max_ms" in lc:
        rows.append(row(
            "the same across a leader failover (lease 6 s), worst", "(reported)",
            f"{lc['failover_completed_max_ms'] / 1000:.2f} s", None, "lifecycle/"))
    if "backup_peak_rss_kib" in b:
        rows.append(row(
            f"backup peak RSS, {b['backup_db_mib']:.0f} MiB database (and a small one)",
            "≤ 64 MiB, flat",
            f"{b['backup_peak_rss_kib'] / 1024:.1f} MiB ({b['backup_small_db_peak_rss_kib'] / 1024:.1f} MiB); "
            f"{b['backup_agent_mib_per_s']} MiB/s vs {b['backup_file_way_mib_per_s']} MiB/s "
            f"for `etcdctl snapshot save` + upload",
            b["backup_peak_rss_kib"] <= 64 * 1024, "backup/"))
    if "idle_rss_kib" in c:
        rows.append(row(
            "daemon idle RSS (max over the window)", "≤ 20 MiB",
            f"{c['idle_rss_kib'] / 1024:.1f} MiB; CPU {c['idle_cpu_percent']}% of a core",
            c["idle_rss_kib"] <= 20 * 1024, "compare/"))
        rows.append(row(
            "bootstrap peak RSS", "(reported)",
            f"{c['bootstrap_peak_rss_kib'] / 1024:.1f} MiB", None, "compare/"))
        rows.append(row(
            "agent binary, stripped", "≤ 20 MB",
            f"{c['binary_bytes'] / 1e6:.1f} MB", c["binary_bytes"] <= 20e6, "compare/"))
        rows.append(row(
            "`kubeboot --version` wall time (p50 of 200)", "≤ 5 ms",
            f"{c['version_p50_ms']} ms", c["version_p50_ms"] <= 5, "compare/"))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    out = [
        "# Benchmarks: kubeboot against the bash + aws-cli way it replaces\n",
        f"- Machine: {machine()}",
        f"- Date: {now} (UTC), source `{source}`",
        f"- Command: `{a.command}`",
        f"- Agent: `{shown}` (the release build the AMI installs)\n",
        "| goal | target | measured | met | details |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Details: [compare/REPORT.md](compare/REPORT.md) (orchestration A/B, join storms, footprint), "
        "[lifecycle/REPORT.md](lifecycle/REPORT.md), [lock/REPORT.md](lock/REPORT.md), "
        "[backup/REPORT.md](backup/REPORT.md).\n",
    ]
    notes = ROOT / "bench/NOTES.md"
    if notes.exists():
        out.append(notes.read_text())
    pathlib.Path(a.out).write_text("\n".join(out) + ("" if out[-1].endswith("\n") else "\n"))


if __name__ == "__main__":
    main()
