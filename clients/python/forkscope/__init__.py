"""Python client for the forkscope daemon (standard library only).

``Sandbox.run(workspace=..., cmd=[...])`` starts a root branch; a :class:`Branch` forks,
runs commands, shows its changes, traces and held side effects, commits and aborts.
"""

from .client import Branch, ExecResult, Sandbox
from .errors import BadRequest, BranchNotFound, Conflict, DaemonNotRunning, ForkscopeError

__all__ = [
    "Sandbox",
    "Branch",
    "ExecResult",
    "ForkscopeError",
    "DaemonNotRunning",
    "BranchNotFound",
    "Conflict",
    "BadRequest",
]
