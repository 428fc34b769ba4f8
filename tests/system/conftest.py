"""tests/system: whole deployments — several replicas, crashes, injected faults, `kgate serve`, benchmark smoke.

Every test here carries the ``system`` marker (``-m system`` selects the folder; tests/conftest.py adds it).
"""
