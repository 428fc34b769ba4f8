"""tests/system: whole deployments — several replicas, crashes, injected faults, `kgate serve`, benchmark smoke.

Every test here carries the ``system`` marker (``-m system`` selects the folder).
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees every collected item of the session, not only this folder's.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.system)
