"""Intake (``docs/architecture.md``): ``admit.py``, the one acceptance path every source hands its parsed
instances to; ``sweep.py``, the start-up removal of spool files no row refers to."""
