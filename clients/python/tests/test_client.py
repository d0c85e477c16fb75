"""The Python client against a real daemon. Run by tests/python_client.rs, which starts the
daemon and sets FORKSCOPE_SOCKET and FORKSCOPE_TEST_DIR (a fresh directory)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

import forkscope
from forkscope import BadRequest, BranchNotFound, Conflict, DaemonNotRunning, Sandbox

TEST_DIR = os.environ.get("FORKSCOPE_TEST_DIR", "")


def fill_queue(path):
    """Connects to Unix socket ``path`` until its queue of connections is full."""
    for _ in range(100000):
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            return
        finally:
            c.close()
    raise AssertionError(f"{path}: the queue never filled")


def workspace(name, files):
    ws = os.path.join(TEST_DIR, name)
    os.makedirs(ws)
    for path, text in files.items():
        with open(os.path.join(ws, path), "w") as f:
            f.write(text)
    return ws


@unittest.skipUnless(TEST_DIR, "run by tests/python_client.rs against a real daemon")
class ClientTest(unittest.TestCase):
    def test_run_fork_exec_diff_commit_abort(self):
        ws = workspace("proj", {"app.py": "print('v1')\n"})
        root = Sandbox.run(workspace=ws, cmd=["sleep", "1000"], name="py-root")
        self.assertEqual(root.name, "py-root")
        kids = root.fork(2)
        self.assertEqual(len(kids), 2)
        a, b = kids
        r = a.exec(["sh", "-c", "echo fixed > app.py; cat app.py; echo oops >&2; exit 3"])
        self.assertEqual((r.exit_code, r.stdout, r.stderr), (3, "fixed\n", "oops\n"))
        # stdin reaches the command; each branch sees only its own files.
        self.assertEqual(b.exec(["cat"], stdin="hello").stdout, "hello")
        self.assertEqual(b.exec(["cat", "app.py"]).stdout, "print('v1')\n")
        self.assertEqual([(c["kind"], c["path"]) for c in a.diff()], [("modified", "app.py")])
        done = a.commit()
        self.assertEqual(done["target"], "py-root")
        self.assertEqual(root.exec(["cat", "app.py"]).stdout, "fixed\n")
        b.abort()
        with self.assertRaises(BranchNotFound):
            b.refresh()
        names = {x.name for x in Sandbox().branches()}
        self.assertIn("py-root", names)
        self.assertNotIn(b.name, names)
        # A command that does not exist: like a shell, 127 and a message.
        r = a.exec(["no-such-command-here"])
        self.assertEqual(r.exit_code, 127)
        self.assertIn("no-such-command-here", r.stderr)
        root.abort(recursive=True)

    def test_a_relative_workspace_is_the_callers(self):
        workspace("rel", {"mine.txt": "the caller's\n"})
        here = os.getcwd()
        os.chdir(TEST_DIR)
        try:
            b = Sandbox.run(workspace="rel", cmd=["sleep", "1000"], name="py-rel")
        finally:
            os.chdir(here)
        try:
            self.assertEqual(b.exec(["cat", "mine.txt"]).stdout, "the caller's\n")
        finally:
            b.abort()

    def test_an_exec_that_times_out_is_killed(self):
        b = Sandbox.run(workspace=workspace("timeout", {}), cmd=["sleep", "1000"], name="py-timeout")
        try:
            with self.assertRaises(Exception):
                b.exec(["sh", "-c", "echo $$ > pid; exec sleep 300"], timeout=1)
            pid = b.exec(["cat", "pid"]).stdout.strip()
            for _ in range(100):
                if b.exec(["kill", "-0", pid]).exit_code != 0:
                    break
                time.sleep(0.1)
            self.assertNotEqual(b.exec(["kill", "-0", pid]).exit_code, 0, "the command was killed")
        finally:
            b.abort()

    def test_trace_and_effects(self):
        ws = workspace("traced", {})
        hits = []
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.2", 0))
        server.listen(8)
        port = server.getsockname()[1]

        def accept():
            c, _ = server.accept()
            hits.append(c.recv(100))
            c.close()

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        policy = '[[rule]]\nclass = "net"\ndest = "127.0.0.2"\naction = "defer"\n'
        br = Sandbox.run(workspace=ws, cmd=["sleep", "1000"], policy=policy)
        br.exec(["sh", "-c", "echo data > out.txt"])
        kinds = {e["kind"] for e in br.trace()}
        self.assertIn("file_write", kinds)
        # A deferred connection: held, listed, let go by the commit.
        script = (f"import socket; s = socket.create_connection(('127.0.0.2', {port}));"
                  " s.sendall(b'ping'); s.close()")
        out = {}
        runner = threading.Thread(target=lambda: out.update(r=br.exec(["python3", "-c", script])))
        runner.start()
        for _ in range(100):
            held = [e for e in br.effects() if e["kind"] == "defer"]
            if held:
                break
            time.sleep(0.05)
        self.assertEqual(held[0]["state"], "held")
        self.assertEqual(hits, [])
        br.commit()
        runner.join(10)
        t.join(10)
        self.assertEqual(out["r"].exit_code, 0)
        self.assertEqual(hits, [b"ping"])
        br.abort()

    def test_a_branch_without_per_write_detail(self):
        ws = workspace("quiet", {})
        br = Sandbox.run(workspace=ws, cmd=["sleep", "1000"], write_detail="off")
        br.exec(["sh", "-c", "echo data > out.txt"])
        kinds = {e["kind"] for e in br.trace()}
        self.assertIn("proc_exec", kinds)
        self.assertNotIn("file_write", kinds)
        self.assertEqual([(c["kind"], c["path"]) for c in br.diff()], [("added", "out.txt")])
        with self.assertRaises(BadRequest) as e:
            Sandbox.run(workspace=ws, cmd=["true"], write_detail="sometimes")
        self.assertIn("write_detail", e.exception.message)
        br.abort()

    def test_errors_carry_the_daemons_message(self):
        with self.assertRaises(BranchNotFound) as e:
            Sandbox().branch("no-such-branch")
        self.assertIn("no-such-branch", e.exception.message)
        self.assertEqual(e.exception.status, 404)
        with self.assertRaises(BadRequest) as e:
            Sandbox.run(workspace=os.path.join(TEST_DIR, "missing"), cmd=["true"])
        self.assertIn("workspace", e.exception.message)
        ws = workspace("named", {})
        first = Sandbox.run(workspace=ws, cmd=["sleep", "1000"], name="dup")
        with self.assertRaises(Conflict):
            Sandbox.run(workspace=ws, cmd=["sleep", "1000"], name="dup")
        with self.assertRaises(TypeError):
            first.exec("echo not a list")
        first.abort()
        self.assertTrue(issubclass(Conflict, forkscope.ForkscopeError))

    def test_no_daemon_says_how_to_start_one(self):
        with self.assertRaises(DaemonNotRunning) as e:
            Sandbox(socket=os.path.join(TEST_DIR, "nothing-here.sock")).status()
        self.assertIn("forkscope daemon", e.exception.message)

    def test_a_socket_left_by_a_dead_daemon_is_said_so_rather_than_waited_on(self):
        # What a daemon killed while it spawned a process leaves: its socket, listening in
        # a child that never answers, made to listen by a process that is gone.
        path = os.path.join(TEST_DIR, "left-behind.sock")
        maker = (
            "import os, socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.bind(sys.argv[1])\n"
            "s.listen()\n"
            "child = os.fork()\n"
            "if child == 0:\n    null = os.open(os.devnull, os.O_WRONLY)\n"
            "    os.dup2(null, 1)\n    os.dup2(null, 2)\n"
            "    time.sleep(60)\n    os._exit(0)\n"
            "print(child, flush=True)\n"
        )
        made = subprocess.run([sys.executable, "-c", maker, path], capture_output=True,
                              text=True, check=True)
        holder = int(made.stdout)
        try:
            # (A timeout, so that a client that waits fails instead of hanging the suite.)
            with self.assertRaises(DaemonNotRunning) as e:
                forkscope._http.call(path, "GET", "/v1/status", timeout=10)
            self.assertIn("is gone", e.exception.message)
            self.assertIn("forkscope daemon", e.exception.message)
            # Each such call leaves its connection queued there; once the queue is full, a
            # call is told so at once (a blocking connect would wait for room forever).
            fill_queue(path)
            with self.assertRaises(DaemonNotRunning) as e:
                forkscope._http.call(path, "GET", "/v1/status", timeout=10)
            self.assertIn("queue is full", e.exception.message)
        finally:
            os.kill(holder, signal.SIGKILL)
            os.unlink(path)

if __name__ == "__main__":
    unittest.main()
