"""The exceptions the client raises, each carrying the daemon's own message."""


class ForkscopeError(Exception):
    """An error from the daemon (``status`` is the HTTP status, ``message`` its text)."""

    def __init__(self, message, status=None, body=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body or {}


class DaemonNotRunning(ForkscopeError):
    """Nothing answers on the socket."""


class BadRequest(ForkscopeError):
    """400: the request was wrong (a bad name, policy, workspace...)."""


class BranchNotFound(ForkscopeError):
    """404: no live branch of that name."""


class Conflict(ForkscopeError):
    """409: the operation conflicts with the branch's state (``conflicts``: paths changed on
    both sides, for a commit)."""

    @property
    def conflicts(self):
        return self.body.get("conflicts", [])


def from_status(status, body):
    message = body.get("error") if isinstance(body, dict) else None
    message = message or f"HTTP {status}"
    cls = {400: BadRequest, 404: BranchNotFound, 409: Conflict}.get(status, ForkscopeError)
    return cls(message, status, body if isinstance(body, dict) else {})
