"""What tests need, one module per job, under the names tests import from here.

- ``configs``: service_config.json on free ports (``write_config``, ``free_ports``,
  ``port_of``, ``service_config``);
- ``running``: the processes a test starts (``Services``, ``Process``, ``processes_naming``,
  ``kill_leftovers``) and the bounds of its waits;
- ``calls``: requests and subscriptions to a service (``request``, ``requests``,
  ``raw_request``, ``collect``, ``stats``).

The fixtures that stop what a test started are in conftest.py.
"""

from __future__ import annotations

import os

# This process talks gRPC and forks the services: gRPC's fork handlers, with its
# threads busy, can abort a process ("Check failed" in thd.h). The children exec at
# once and need none. Read by gRPC when it is first imported (in calls), hence before it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from calls import collect, raw_request, request, requests, stats
from configs import free_ports, port_of, service_config, write_config
from running import STARTUP_TIMEOUT_S, WAIT_TIMEOUT_S, Process, Services, kill_leftovers, processes_naming

from tools.processes import ROOT

__all__ = [
    "ROOT",
    "STARTUP_TIMEOUT_S",
    "WAIT_TIMEOUT_S",
    "Process",
    "Services",
    "collect",
    "free_ports",
    "kill_leftovers",
    "port_of",
    "processes_naming",
    "raw_request",
    "request",
    "requests",
    "service_config",
    "stats",
    "write_config",
]
