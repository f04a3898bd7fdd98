"""Collecting: the Monitor on the hot path, its device-side buckets and the host-side ledger, the
bounded per-step history, the run's own clipping tallied, the flight recorder and the reductions
over ranks. The only code that touches gradient hooks and gradients.
"""
