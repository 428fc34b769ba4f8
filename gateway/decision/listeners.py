"""Starting and stopping kgate's plugin listeners beside the proxy: the decision API (HTTP/JSON on TCP or a
Unix socket) and Envoy's external processor (gRPC), both over the proxy's own engine and state."""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from typing import Any

from aiohttp import web

from gateway.decision.http import create_decision_app
from gateway.decision.service import DecisionService
from gateway.engine.flow import Engine
from gateway.policy.config import DecisionConfig, parse_listener
from gateway.proxy.server import StartupError

log = logging.getLogger("kgate.decision")


class PluginListeners:
    """The decision service and whatever serves it; :meth:`close` settles what is still waiting."""

    def __init__(self, service: DecisionService):
        self.service = service
        self._runner: web.AppRunner | None = None
        self._grpc: Any = None
        self.addresses: list[str] = []
        self._closed = False

    async def start(self, cfg: DecisionConfig, listen: tuple[str, ...], extproc: str | None) -> None:
        token = os.environ.get(cfg.token_env) or None
        tls = _tls_context(cfg)
        if listen:
            self._runner = web.AppRunner(create_decision_app(self.service, token), access_log=None,
                                         handle_signals=False)
            await self._runner.setup()
            for item in listen:
                where = parse_listener(item)
                if isinstance(where, str):
                    site: web.BaseSite = web.UnixSite(self._runner, where)
                else:
                    if token is None and tls is None and not is_loopback(where[0]):
                        raise StartupError(
                            f"the decision API on {item} would be open to the network: set ${cfg.token_env} "
                            "(a bearer token), or decision.tls_client_ca (client certificates), or listen on "
                            "loopback or unix:/path")
                    site = web.TCPSite(self._runner, where[0], where[1], reuse_address=True, ssl_context=tls)
                try:
                    await site.start()
                except OSError as exc:
                    raise StartupError(f"cannot listen for the decision API on {item}: "
                                       f"{exc.strerror or exc}") from None
                if isinstance(where, str):
                    os.chmod(where, 0o660)  # the socket's group may call it; nobody else
                self.addresses.append(item)
        if extproc:
            from gateway.decision.extproc import start_extproc

            self._grpc = await start_extproc(self.service, extproc, token=token)
            self.addresses.append(f"ext_proc {extproc}")

    def bound_url(self) -> str | None:
        """``http://HOST:PORT`` of the first TCP listener, as bound (a port 0 resolved), or None."""
        if self._runner is None:
            return None
        for site in self._runner.sites:
            server = getattr(site, "_server", None)
            if isinstance(site, web.TCPSite) and server is not None and server.sockets:
                host, port = server.sockets[0].getsockname()[:2]
                scheme = "https" if getattr(site, "_ssl_context", None) else "http"
                return f"{scheme}://{host}:{port}"
        return None

    async def close(self, grace: float = 0.0) -> None:
        """Stop taking new requests, give the admitted ones ``grace`` seconds to settle, then settle the rest
        as unanswered (and record them)."""
        if self._closed:
            return
        self._closed = True
        if grace > 0:
            await self.service.wait_idle(grace)
        if self._grpc is not None:
            await self._grpc.stop(0.5)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.service.close()


async def start_plugins(engine: Engine, cfg: DecisionConfig, listen: tuple[str, ...],
                        extproc: str | None) -> PluginListeners:
    plugins = PluginListeners(DecisionService(engine, settle_timeout=cfg.settle_timeout_seconds))
    try:
        await plugins.start(cfg, listen, extproc)
    except BaseException:
        await plugins.close()
        raise
    return plugins


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(cfg: DecisionConfig) -> ssl.SSLContext | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca is not None:
            ctx.load_verify_locations(cfg.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"decision API TLS: {exc}") from None
    return ctx
