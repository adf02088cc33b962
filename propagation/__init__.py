"""What agent.py, supervisor.py and storage.py share, one job per module.

- ``startup``: imported first by every script: what must happen before gRPC loads.
- ``cli``: the command line, exit codes, running a service until a signal.
- ``config``, ``args``: the config file, read with bounds; a service's args, typed.
- ``network``: a host as gRPC reads it, loopback or not, free ports, addresses.
- ``serving``, ``guard``: the gRPC server with this example's limits; what it refuses.
- ``peers``: ``PeerClient``, a client of one peer: one channel, bounded calls, liveness.
- ``wire``: the example's paths and their messages, its extra timestamps.
- ``residuals``: when an agent publishes: levels re-asserted on a period, and their order.
- ``relaying``: what a supervisor's round trip stands on: its queue, agent links, freshness.
- ``pacing``: an agent's tasks publishing on a shared schedule, paused while storage is full.
- ``stats``, ``logs``: the counters on ``/stats``; log lines once, never blocking.

Importing this package does nothing.
"""
