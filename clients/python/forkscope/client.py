"""Sandboxes and branches: thin wrappers over the daemon's API (see docs in the repo)."""

import os
import json
import urllib.parse

from ._http import call, socket_path


class ExecResult:
    """What a command run in a branch did."""

    def __init__(self, d):
        self.exit_code = d["exit_code"]
        self.signal = d.get("signal")
        self.stdout = d.get("stdout", "")
        self.stderr = d.get("stderr", "")
        self.truncated = d.get("truncated", 0)

    def __repr__(self):
        return f"ExecResult(exit_code={self.exit_code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class Forked(list):
    """The branches a fork made; ``phases`` (microseconds) and ``notes`` from the daemon."""

    def __init__(self, branches, reply):
        super().__init__(branches)
        self.phases = reply.get("phases", {})
        self.notes = reply.get("notes", [])
        self.processes = reply.get("processes", "")


class Branch:
    """A live branch (``name``); ``info`` is the daemon's last description of it."""

    def __init__(self, socket, info):
        self._socket = socket
        self.info = info
        self.name = info["name"]

    def __repr__(self):
        return f"Branch({self.name!r})"

    def _url(self, tail=""):
        return f"/v1/branches/{urllib.parse.quote(self.name, safe='')}{tail}"

    def refresh(self):
        """Reads the branch's description again (status, processes, private memory...)."""
        self.info = call(self._socket, "GET", self._url())
        return self.info

    def fork(self, n=1, name=None, frozen=False, fresh=False):
        """``n`` children at this branch's current state (files and processes); returns them."""
        body = {"count": n, "frozen": frozen, "fresh": fresh}
        if name is not None:
            body["name"] = name
        made = call(self._socket, "POST", self._url("/fork"), body)
        return Forked([Branch(self._socket, b) for b in made["branches"]], made)

    def exec(self, cmd, stdin="", cwd=None, env=None, timeout=None):
        """Runs ``cmd`` (a list) in the branch; returns when it exits, with what it wrote
        until then (background processes it started keep running; their later output is
        dropped). If the call times out or is interrupted, the daemon kills the command."""
        if isinstance(cmd, str):
            raise TypeError("cmd is a list of arguments, e.g. ['sh', '-c', 'make test']")
        body = {"argv": list(cmd), "stdin": stdin, "env": [list(kv) for kv in (env or {}).items()]}
        if cwd is not None:
            body["cwd"] = cwd
        return ExecResult(call(self._socket, "POST", self._url("/exec"), body, timeout=timeout))

    def diff(self):
        """The branch's changes since its fork point: ``[{"kind", "path", ...}]``."""
        return call(self._socket, "GET", self._url("/diff"))

    def commit(self, prefer=None):
        """Applies the branch's changes to its parent (the host workspace for a root branch)
        and releases its held side effects; returns the daemon's report."""
        body = {} if prefer is None else {"prefer": prefer}
        return call(self._socket, "POST", self._url("/commit"), body)

    def abort(self, recursive=False):
        """Ends the branch (with ``recursive``, the branches forked from it first)."""
        call(self._socket, "DELETE", self._url("?recursive=true" if recursive else ""))

    def trace(self):
        """The branch's side-effect events so far."""
        text = call(self._socket, "GET", self._url("/trace"), raw=True)
        # The tracer may be writing a line: one not ended yet is not part of the trace.
        text = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def effects(self):
        """Side effects held for the branch's commit, or recorded (buffered), with state and age."""
        return call(self._socket, "GET", self._url("/effects"))

    def set_policy(self, toml_text):
        """Replaces the branch's side-effect policy (TOML)."""
        self.info = call(self._socket, "PUT", self._url("/policy"), {"policy": toml_text})
        return self.info


class Sandbox:
    """The daemon on ``socket`` (default: ``FORKSCOPE_SOCKET`` or /run/forkscope/forkscope.sock)."""

    def __init__(self, socket=None):
        self.socket = socket_path(socket)

    @classmethod
    def run(cls, workspace, cmd=(), name=None, net=None, policy=None, socket=None, write_detail=None):
        """Starts a root branch on ``workspace`` running ``cmd``; returns it.

        ``write_detail``: "on" (the default: every write, send and open is in its trace) or
        "off" (no syscall program is attached on its behalf; its files come from ``diff()``,
        its sends per destination from its packets)."""
        s = cls(socket)
        # Absolute here: the daemon's working directory is not the caller's.
        body = {"workspace": os.path.abspath(os.fspath(workspace)), "command": list(cmd)}
        for k, v in (("name", name), ("net", net), ("policy", policy), ("write_detail", write_detail)):
            if v is not None:
                body[k] = v
        return Branch(s.socket, call(s.socket, "POST", "/v1/branches", body))

    def branches(self):
        """Every live branch."""
        return [Branch(self.socket, b) for b in call(self.socket, "GET", "/v1/branches")]

    def branch(self, name):
        """The live branch ``name``."""
        return Branch(self.socket, call(self.socket, "GET", f"/v1/branches/{urllib.parse.quote(name, safe='')}"))

    def status(self):
        """The daemon's version, state directory, branch count, tracer counters."""
        return call(self.socket, "GET", "/v1/status")
