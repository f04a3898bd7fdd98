"""Collecting: the Monitor's hot path (the Observer), its device-side buckets and the host-side ledger,
the bounded per-step history, the run's own clipping tallied and the reductions over ranks. The only
code that touches gradient hooks and gradients, and it writes nothing: the report and the flight
recorder sit at the edge (``gradscope.monitor``, ``gradscope.recorder``).
"""
