"""Rules of tests/unit: no processes, no Redis, no subprocesses; the whole folder runs in under 10 s.

- Every test here carries the ``unit`` marker (``-m unit`` selects the folder, ``-m 'not unit'`` skips it).
- A test that starts a process fails: :func:`subprocess.Popen` (so ``subprocess.run`` and friends),
  ``asyncio.create_subprocess_exec``/``_shell`` and the event loop's ``subprocess_exec``/``_shell``,
  ``os.fork``/``forkpty``/``posix_spawn``/``posix_spawnp``/``system`` and ``multiprocessing``'s
  ``Process.start`` raise :class:`ProcessInUnitTest` during its setup, call and teardown (fixtures of any
  scope included). A test that catches that error still fails afterwards: the attempt is recorded.
  A test that needs a process belongs in tests/integration (or tests/system).
- Hypothesis runs the ``unit`` profile: 100 examples per property unless a test sets its own count, no
  deadline (a loaded 2-core machine must not turn a slow example into a failure). For a longer search run
  ``HYPOTHESIS_PROFILE=thorough python -m pytest tests/unit`` (1000 examples; works for any selection).
  ``--hypothesis-profile=thorough`` wins over the variable, but only with tests/unit (or a file in it) named
  on the command line: hypothesis loads that option's profile before pytest imports this file.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.subprocess
import multiprocessing.process
import os
import subprocess
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

HERE = Path(__file__).resolve().parent

settings.register_profile("unit", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)


def pytest_configure(config: pytest.Config) -> None:
    # Called when this conftest is imported, before the test modules of the folder are: their @settings
    # take their defaults from the profile loaded here.
    if config.getoption("hypothesis_profile", None) is None:
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unit"))


# ------------------------------------------------------------------------------------- no processes
class ProcessInUnitTest(RuntimeError):
    """A unit test tried to start a process."""


# (owner, attribute name, what the message calls it)
_STARTERS: list[tuple[Any, str, str]] = [
    (subprocess.Popen, "_execute_child", "subprocess.Popen"),
    (asyncio, "create_subprocess_exec", "asyncio.create_subprocess_exec"),
    (asyncio, "create_subprocess_shell", "asyncio.create_subprocess_shell"),
    (asyncio.subprocess, "create_subprocess_exec", "asyncio.create_subprocess_exec"),
    (asyncio.subprocess, "create_subprocess_shell", "asyncio.create_subprocess_shell"),
    (asyncio.base_events.BaseEventLoop, "subprocess_exec", "loop.subprocess_exec"),
    (asyncio.base_events.BaseEventLoop, "subprocess_shell", "loop.subprocess_shell"),
    (multiprocessing.process.BaseProcess, "start", "multiprocessing Process.start"),
    *((os, name, f"os.{name}") for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")
      if hasattr(os, name)),
]


def _message(what: str) -> str:
    return (f"tests/unit must not start processes ({what} was called); "
            "move the test to tests/integration")


@contextmanager
def _no_processes() -> Iterator[list[str]]:
    """Every process starter raises :class:`ProcessInUnitTest` inside the block; yields the attempts."""
    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def starter(*_args: Any, **_kwargs: Any) -> Any:
            attempts.append(what)
            raise ProcessInUnitTest(_message(what))
        return starter

    with pytest.MonkeyPatch.context() as mp:
        for owner, name, what in _STARTERS:
            mp.setattr(owner, name, refuse(what))
        yield attempts


def _guarded(phase: str, item: pytest.Item) -> Generator[None, object, object]:
    with _no_processes() as attempts:
        result = yield  # raises what the phase raised
    if attempts:  # the phase passed although it tried to start a process: it caught the error
        pytest.fail(f"{item.nodeid} ({phase}): {_message(', '.join(dict.fromkeys(attempts)))}", pytrace=False)
    return result


# These hooks run through item.ihook, so only for the items of this folder.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded("setup", item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded("call", item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded("teardown", item))
