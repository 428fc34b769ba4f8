"""Prometheus metrics: every series kgate exports, and the event loop's lock-free counters."""
