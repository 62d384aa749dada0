"""Websites the tests serve on loopback, and a resolver that sends names to them.

Test sites listen on 127.0.0.1, itself a private address; a fetcher admits them only through
`extra_allowed` (their exact address and port), and names like `public.test` reach them through an
injected resolver. Everything else is judged exactly as in production.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import ip_address

from kubearq.core.contract import FetchPolicy
from kubearq.worker.net.policy import IPAddress
from kubearq.worker.scrape.fetch import Fetcher
from kubearq.worker.scrape.robots import RobotsCache

HTML = {"Content-Type": "text/html; charset=utf-8"}


@dataclass
class Reply:
    """What a test site answers on one path."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: dict(HTML))
    body: bytes = b"<html><body>ok</body></html>"
    trickle_seconds: float | None = None
    """Send the body one byte at a time, this long apart (a slow server)."""
    drop: bool = False
    """Close the connection without answering."""
    chunked: bool = False
    """Send the body chunked (no Content-Length), 1000 bytes a chunk."""
    hold: asyncio.Event | None = None
    """Answer only once this event is set (a response held open until the test says so)."""


class Website:
    """An HTTP/1.1 server on a loopback address: fixed replies by path, every request logged.

    A route is one reply, or a list of replies served in turn (the last one repeating).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.routes: dict[str, Reply | list[Reply]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    @property
    def endpoint(self) -> tuple[IPAddress, int]:
        return ip_address(self.host), self.port

    def url(self, path: str = "/", name: str = "public.test") -> str:
        return f"{'https' if self.tls else 'http'}://{name}:{self.port}{path}"

    async def __aenter__(self) -> Website:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def _reply_for(self, path: str) -> Reply:
        route = self.routes.get(path, Reply(404, body=b"not found"))
        if isinstance(route, Reply):
            return route
        return route.pop(0) if len(route) > 1 else route[0]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
            self.requests.append((path, headers))
            reply = self._reply_for(path)
            if reply.hold is not None:
                await reply.hold.wait()
            if not reply.drop:
                await self._answer(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away: that is what several tests do on purpose
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        body = reply.body
        length = {"Content-Length": str(len(body))}
        if reply.chunked:
            length = {"Transfer-Encoding": "chunked"}
            body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                            for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
        headers = {**length, "Connection": "close", **reply.headers}
        lines = [f"HTTP/1.1 {reply.status} X", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        if reply.trickle_seconds is None:
            writer.write(body)
            await writer.drain()
            return
        for byte in reply.body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(reply.trickle_seconds)  # the slowness under test, not a wait for a condition


class FakeResolver:
    """Names → addresses, as the tests say; a list of answers is served in turn, the last one repeating."""

    def __init__(self, answers: Mapping[str, Sequence[str] | list[list[str]]]) -> None:
        self._answers = {name: list(answer) for name, answer in answers.items()}
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        self.calls.append(host)
        answer = self._answers.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if answer and isinstance(answer[0], list):
            current = answer.pop(0) if len(answer) > 1 else answer[0]
            return [ip_address(a) for a in current]
        return [ip_address(str(a)) for a in answer]


def fetcher_for(
    *sites: Website,
    policy: FetchPolicy | None = None,
    resolver: FakeResolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    now: Callable[[], datetime] | None = None,
    robots_cache: RobotsCache | None = None,
) -> Fetcher:
    """A fetcher that may reach exactly these sites (by address and port) and resolves `public.test` to them."""
    return Fetcher(
        policy or FetchPolicy(obey_robots_txt=False),
        resolver=resolver or FakeResolver({"public.test": ["127.0.0.1"]}),
        extra_allowed=frozenset(site.endpoint for site in sites),
        ssl_context=ssl_context,
        robots_cache=robots_cache,
        **({"now": now} if now else {}),
    )
