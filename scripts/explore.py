#!/usr/bin/env python3
"""The exploration demo: an agent-style search over candidate fixes, one branch each.

A small project has a failing test. The demo runs a sandbox on it, forks one branch per
candidate fix, applies and tests every candidate in parallel, commits the branch whose
tests pass (into the root branch, then the root into the host directory), aborts the
others, and prints the branch tree with each fork's latency, each branch's changed files,
side effects and private memory pages, and where the metrics are.

Usage: FORKSCOPE_SOCKET=... scripts/explore.py WORKDIR   (scripts/demo starts the daemon)
"""
import collections, os, subprocess, sys, threading, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))
from forkscope import ForkscopeError, Sandbox  # noqa: E402

CALC = "def add(a, b):\n    return a - b\n"
TEST = """import unittest
from calc import add

class T(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)
        self.assertEqual(add(-1, 1), 0)

if __name__ == "__main__":
    unittest.main()
"""
# The tests leave no bytecode behind: the project gets exactly the fix.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}
CANDIDATES = {
    "swap-operands": "def add(a, b):\n    return b - a\n",
    "multiply": "def add(a, b):\n    return a * b\n",
    "plus": "def add(a, b):\n    return a + b\n",
    "abs-diff": "def add(a, b):\n    return abs(a - b)\n",
}


def write_report(root_name):
    """Exports the tree's traces (Perfetto JSON), its report (text) and its chart (SVG) to
    $FORKSCOPE_DEMO_OUT with the `forkscope` CLI at $FORKSCOPE_BIN (scripts/demo sets both)."""
    out, cli = os.environ.get("FORKSCOPE_DEMO_OUT"), os.environ.get("FORKSCOPE_BIN")
    if not out or not cli:
        return
    os.makedirs(out, exist_ok=True)
    trace, report, chart = (os.path.join(out, f) for f in ("exploration.json", "report.txt", "tree.svg"))
    try:
        subprocess.run([cli, "export", root_name, "--tree", "-o", trace], check=True)
        with open(report, "w") as f:
            subprocess.run([cli, "report", "--input", trace, "--svg", chart], stdout=f, check=True)
        with open(report) as f:
            first = f.readline().strip()
    except (OSError, subprocess.CalledProcessError) as e:
        # The exploration itself is done: a report that could not be written is only said.
        print(f"\nthe trace report could not be written: {e}")
        return
    print(f"\n{first}")
    print(f"  trace (open in ui.perfetto.dev): {trace}")
    print(f"  report per branch (events, top files, fork and commit latencies): {report}")
    print(f"  branch tree over time: {chart}")


def crash_if_asked(cand, branch):
    """FORKSCOPE_DEMO_CRASH=CANDIDATE kills that candidate's branch (its init and every
    process, through its cgroup) as it starts: how the demo copes with a branch that dies."""
    if os.environ.get("FORKSCOPE_DEMO_CRASH") == cand:
        with open(os.path.join(branch.refresh()["cgroup"], "cgroup.kill"), "w") as f:
            f.write("1")


def main():
    work = sys.argv[1]
    proj = os.path.join(work, "proj")
    os.makedirs(proj, exist_ok=True)
    for name, text in (("calc.py", CALC), ("test_calc.py", TEST)):
        with open(os.path.join(proj, name), "w") as f:
            f.write(text)
    sb = Sandbox()
    try:
        root = Sandbox.run(workspace=proj, cmd=["sleep", "infinity"], name="explore")
    except ForkscopeError as e:
        print(f"the demo could not start its sandbox: {e.message}", file=sys.stderr)
        return 1
    try:
        first = root.exec(["python3", "test_calc.py"], env=NO_PYC)
        print(f"project {proj}: its test fails (exit {first.exit_code})\n")
        forks = []
        for cand in CANDIDATES:
            t = time.perf_counter()
            made = root.fork(name=f"fix-{cand}")
            forks.append((cand, made[0], (time.perf_counter() - t) * 1000, made.phases))
        results, failed = {}, {}

        def attempt(cand, branch):
            # A branch that fails is one candidate less: reported, and the others go on.
            try:
                crash_if_asked(cand, branch)
                code = CANDIDATES[cand].replace("\n", "\\n")
                branch.exec(["sh", "-c", f"printf '{code}' > calc.py"])
                results[cand] = branch.exec(["python3", "test_calc.py"], env=NO_PYC)
            except ForkscopeError as e:
                failed[cand] = e.message

        threads = [threading.Thread(target=attempt, args=(c, b)) for c, b, _, _ in forks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("branch tree (fork latency through the API, its phases in the daemon):")
        print(f"  {root.name}  (root on {proj})")
        for cand, b, ms, ph in forks:
            timing = (f"fork {ms:6.1f} ms (freeze {ph.get('freeze_us', 0)} us, "
                      f"files {ph.get('files_us', 0)} us, processes {ph.get('processes_us', 0)} us)")
            if cand in failed:
                print(f"  └─ {b.name:<20} FAILED: {failed[cand]}")
                print(f"       {timing}; left out")
                continue
            info = b.refresh()
            diff = [c["path"] for c in b.diff()]
            kinds = collections.Counter(e["kind"] for e in b.trace() if not e["kind"].startswith("branch_"))
            effects = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
            code = results[cand].exit_code
            verdict = "PASS" if code == 0 else f"fail (exit {code})"
            print(f"  └─ {b.name:<20} tests {verdict:<13} {timing}")
            print(f"       changed: {', '.join(diff) or 'nothing'}; private pages: {info.get('private_pages')}; "
                  f"side effects: {effects}")
        winners = [c for c in CANDIDATES if c in results and results[c].exit_code == 0]
        if len(winners) != 1:
            print(f"\nexpected exactly one passing candidate, got {winners or 'none'}: nothing committed")
            return 1
        win = winners[0]
        winner = next(b for c, b, _, _ in forks if c == win)
        winner.commit()
        root.commit()
        write_report(root.name)
        with open(os.path.join(proj, "calc.py")) as f:
            landed = f.read()
        ok = landed == CANDIDATES[win]
        print(f"\ncommitted {winner.name} into {root.name}, then {root.name} into {proj}: "
              f"calc.py is the winning fix: {ok}")
        status = sb.status()
        if status.get("metrics_addr"):
            print(f"metrics: http://{status['metrics_addr']}/metrics (dashboards in dashboards/grafana)")
        return 0 if ok else 1
    except ForkscopeError as e:
        print(f"the demo failed: {e.message}", file=sys.stderr)
        return 1
    finally:
        # The candidates, then the root: whatever happened, no branch is left.
        try:
            root.abort(recursive=True)
        except ForkscopeError as e:
            print(f"cleaning up: {e.message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
