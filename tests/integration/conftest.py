"""tests/integration: the gateway in-process against real Redis servers and subprocesses the tests start.

Every test here carries the ``integration`` marker (``-m integration`` selects the folder; tests/conftest.py adds it).
"""
