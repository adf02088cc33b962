"""What agent.py, supervisor.py and storage.py share, one job per module.

- ``cli``: the command line and the service's args, checked before gRPC loads; exit codes.
- ``config``: reading a config file with bounds, and its entries as typed values.
- ``logs``: log lines once, through a queue, never blocking the event loop.
- ``serving``: the gRPC server with this example's limits, and serving until a signal.
- ``guard``: what a server refuses: a request or subscription the contract does not name.
- ``peers``: ``PeerClient``, a client of one peer: one channel, bounded calls, liveness.
- ``wire``: the example's paths and their messages, its extra timestamps, residual order.
- ``pacing``: an agent's tasks publishing on a shared schedule, paused while storage is full.
- ``relaying``: a supervisor's queue of samples, its batches and its wake-ups.
- ``stats``: the counters each service publishes on ``/stats``.

Importing this package does nothing.
"""
