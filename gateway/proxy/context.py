"""The aiohttp app's handles on the gateway's state (:class:`gateway.engine.state.Gateway`) and on the
engine that runs its requests (:class:`gateway.engine.flow.Engine`)."""

from __future__ import annotations

from aiohttp import web

from gateway.engine.flow import Engine
from gateway.engine.state import Gateway

__all__ = ["ENGINE", "GATEWAY", "Gateway"]

GATEWAY: web.AppKey[Gateway] = web.AppKey("kgate_gateway", Gateway)
ENGINE: web.AppKey[Engine] = web.AppKey("kgate_engine", Engine)
