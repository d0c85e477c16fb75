#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/grafana/ (run after changing a panel here:
the JSON files are generated, not edited by hand). Every query reads only metrics the
daemon exports (userspace/src/metrics.rs); tests/metrics.rs evaluates each one against a
real Prometheus server."""
import json, os

HERE = os.path.dirname(os.path.abspath(__file__))
I = 'instance=~"$instance"'


def panel(id, title, kind, exprs, x, y, w=12, h=8, unit=None, legend=None):
    p = {
        "id": id, "title": title, "type": kind,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": (legend[i] if legend else "")}
                    for i, e in enumerate(exprs)],
        "fieldConfig": {"defaults": {"unit": unit or "short"}, "overrides": []},
        "options": {},
    }
    if kind == "heatmap":
        p["targets"][0]["format"] = "heatmap"
        p["options"] = {"calculate": False, "yAxis": {"unit": "s"}}
    return p


def variable(name, label, query):
    return {
        "name": name, "type": "query", "label": label,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2,
    }


def dash(uid, title, panels, branch_var=False):
    templating = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
         "current": {}, "hide": 0},
        variable("instance", "daemon", "label_values(forkscope_build_info, instance)"),
    ]
    if branch_var:
        templating.append(variable("branch", "branch (needs --metrics-branch-labels)",
                                   "label_values(forkscope_branch_private_memory_bytes, branch)"))
    return {
        "uid": uid, "title": title, "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["forkscope"], "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": templating}, "panels": panels,
    }


def q(metric, extra=""):
    """A selector of `metric` on the chosen daemons, plus `extra` matchers."""
    return metric + "{" + I + (", " + extra if extra else "") + "}"


RATE = "[$__rate_interval]"


def quantile(qv, metric):
    return f"histogram_quantile({qv}, sum by (le) (rate({q(metric)}{RATE})))"


overview = dash("forkscope-overview", "forkscope: overview", [
    panel(1, "Fork latency (p50, p90, p99)", "timeseries",
          [quantile(v, "forkscope_fork_duration_seconds_bucket") for v in (0.5, 0.9, 0.99)],
          0, 0, unit="s", legend=["p50", "p90", "p99"]),
    panel(2, "Fork latency heatmap", "heatmap",
          [f"sum by (le) (increase({q('forkscope_fork_duration_seconds_bucket')}{RATE}))"],
          12, 0, legend=["{{le}}"]),
    panel(3, "Fork time by phase (mean)", "timeseries",
          [f"sum by (phase) (rate({q('forkscope_fork_phase_duration_seconds_sum')}{RATE})) / "
           f"sum by (phase) (rate({q('forkscope_fork_phase_duration_seconds_count')}{RATE}))"],
          0, 8, unit="s", legend=["{{phase}}"]),
    panel(4, "Commit and abort latency (p90)", "timeseries",
          [quantile(0.9, "forkscope_commit_duration_seconds_bucket"),
           quantile(0.9, "forkscope_abort_duration_seconds_bucket")],
          12, 8, unit="s", legend=["commit", "abort"]),
    panel(5, "Operations per second", "timeseries",
          [f"sum(rate({q(m)}{RATE}))" for m in ("forkscope_fork_duration_seconds_count",
                                                "forkscope_commit_duration_seconds_count",
                                                "forkscope_abort_duration_seconds_count")],
          0, 16, unit="ops", legend=["forks", "commits", "aborts"]),
    panel(6, "Branches by state", "timeseries", [f"sum by (state) ({q('forkscope_branches')})"],
          12, 16, legend=["{{state}}"]),
    panel(7, "Events per second by kind", "timeseries",
          [f"sum by (kind) (rate({q('forkscope_events_total')}{RATE}))"],
          0, 24, unit="ops", legend=["{{kind}}"]),
    panel(8, "Lost events", "stat", [f"sum(increase({q('forkscope_lost_events_total')}[$__range]))"],
          12, 24, w=6),
    panel(9, "Private memory of all branches", "stat", [f"sum({q('forkscope_private_memory_bytes')})"],
          18, 24, w=6, unit="bytes"),
])

effects = dash("forkscope-side-effects", "forkscope: side effects", [
    panel(1, "Held and recorded side effects by kind and state", "timeseries",
          [f"sum by (kind, state) ({q('forkscope_side_effects')})"], 0, 0, legend=["{{kind}} {{state}}"]),
    panel(2, "Policy decisions per second by action", "timeseries",
          [f"sum by (action) (rate({q('forkscope_policy_decisions_total')}{RATE}))"],
          12, 0, unit="ops", legend=["{{action}}"]),
    panel(3, "Oldest held effect", "stat", [f"max({q('forkscope_side_effect_oldest_held_age_seconds')})"],
          0, 8, w=6, unit="s"),
    panel(4, "Side effects by class (events per second)", "timeseries",
          [f"sum(rate({q('forkscope_events_total', 'kind=~' + chr(34) + c + chr(34))}{RATE}))"
           for c in ("file_.*", "net_.*", "proc_.*")],
          6, 8, w=18, unit="ops", legend=["files", "network", "processes"]),
    panel(6, "Side effects held per branch", "timeseries",
          [f"sum by (branch) ({q('forkscope_branch_side_effects', 'branch=~' + chr(34) + '$branch' + chr(34) + ', state=' + chr(34) + 'held' + chr(34))})"],
          0, 24, unit="short", legend=["{{branch}}"]),
    panel(7, "Traced events per second per branch", "timeseries",
          [f"sum by (branch) (rate({q('forkscope_branch_events_total', 'branch=~' + chr(34) + '$branch' + chr(34))}{RATE}))"],
          12, 24, unit="ops", legend=["{{branch}}"]),
    panel(5, "Private memory by branch", "timeseries",
          [f"sum by (branch) ({q('forkscope_branch_private_memory_bytes', 'branch=~' + chr(34) + '$branch' + chr(34))})"],
          0, 16, w=24, unit="bytes", legend=["{{branch}}"]),
], branch_var=True)

ebpf = dash("forkscope-ebpf", "forkscope: eBPF overhead", [
    panel(1, "CPU time in forkscope's eBPF programs (fraction of one CPU)", "timeseries",
          [f"sum by (program) (rate({q('forkscope_bpf_program_run_time_seconds_total')}{RATE}))"],
          0, 0, w=24, unit="percentunit", legend=["{{program}}"]),
    panel(2, "Program runs per second", "timeseries",
          [f"sum by (program) (rate({q('forkscope_bpf_program_runs_total')}{RATE}))"],
          0, 8, unit="ops", legend=["{{program}}"]),
    panel(3, "Mean time per run", "timeseries",
          [f"sum by (program) (rate({q('forkscope_bpf_program_run_time_seconds_total')}{RATE})) / "
           f"sum by (program) (rate({q('forkscope_bpf_program_runs_total')}{RATE}))"],
          12, 8, unit="s", legend=["{{program}}"]),
    panel(4, "Syscall programs attached (1: a branch asks for per-write detail; every process on the host pays the slower syscall path)", "timeseries",
          [f"max by (instance) ({q('forkscope_syscall_programs_attached')})"],
          0, 16, unit="short", legend=["{{instance}}"]),
    panel(5, "Page-fault programs attached (1: some branch is traced; every page fault on the host runs them)", "timeseries",
          [f"max by (instance) ({q('forkscope_page_fault_programs_attached')})"],
          12, 16, unit="short", legend=["{{instance}}"]),
])

for name, d in (("overview", overview), ("side-effects", effects), ("ebpf", ebpf)):
    with open(os.path.join(HERE, "grafana", f"{name}.json"), "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
