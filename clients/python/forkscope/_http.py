"""JSON over HTTP/1.1 on the daemon's Unix socket."""

import http.client
import json
import os
import socket
import struct

from .errors import DaemonNotRunning, from_status

DEFAULT_SOCKET = "/run/forkscope/forkscope.sock"


def socket_path(given=None):
    return given or os.environ.get("FORKSCOPE_SOCKET") or DEFAULT_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("forkscope", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Connected without waiting: a blocking connect waits forever for room in a queue
        # of connections nobody takes.
        s.setblocking(False)
        try:
            s.connect(self._path)
        except BlockingIOError:
            s.close()
            raise DaemonNotRunning(
                f"no forkscope daemon takes connections on {self._path} (its queue is full): "
                "the daemon that made it is gone or stuck; start it again with "
                "`forkscope daemon` (it takes the socket over)"
            ) from None
        except BaseException:
            s.close()
            raise
        try:
            s.settimeout(self.timeout)
            # A daemon killed while it spawned a process leaves its socket listening in that
            # child: the kernel accepts the connection and nobody ever answers.
            pid = _listener_pid(s)
            if pid > 0 and not _alive(pid):
                raise DaemonNotRunning(
                    f"the forkscope daemon that listened at {self._path} (pid {pid}) is gone; "
                    "a process it was starting still holds the socket, and nobody answers "
                    "there: start the daemon again with `forkscope daemon` (it takes the "
                    "socket over)"
                )
        except BaseException:
            s.close()
            raise
        self.sock = s


def _listener_pid(s):
    """The pid of the process that made the socket listen (0 when the kernel does not say)."""
    try:
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return 0
    return pid


def _alive(pid):
    """Whether process ``pid`` lives (a zombie does not). Asked with a null signal, which
    needs no sight of /proc (``hidepid`` hides root's processes from other users); /proc only
    tells a zombie, and an entry that cannot be read counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def call(path, method, url, body=None, timeout=None, raw=False):
    """Sends one request; returns the decoded JSON answer (or the text with ``raw``)."""
    conn = _UnixConnection(path, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonNotRunning(
                f"no forkscope daemon answers on {path} ({e.strerror}): start one with "
                "`forkscope daemon` (as root), or point FORKSCOPE_SOCKET at its socket"
            ) from None
        except PermissionError:
            raise DaemonNotRunning(
                f"{path} is not open to this user: run as root, or start the daemon with "
                "--socket-group GROUP and join that group"
            ) from None
        text = resp.read().decode("utf-8", "replace")
        if resp.status >= 400:
            try:
                payload = json.loads(text)
            except ValueError:
                payload = {"error": text.strip()}
            raise from_status(resp.status, payload)
        if raw:
            return text
        return json.loads(text) if text.strip() else None
    finally:
        conn.close()
