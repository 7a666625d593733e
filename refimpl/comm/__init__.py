"""Communicators: the one interface the ring talks to, with an in-process and an MPI implementation."""

from .base import Comm, CommError, DeadlockError, RankAborted
from .sim import SimWorld

__all__ = ["Comm", "CommError", "DeadlockError", "RankAborted", "SimWorld"]
