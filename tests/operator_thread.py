"""The real operator (`run_operator`: its watch, its leader, its dashboard) in a thread of its own, for tests that
drive it from outside: kopf cancels foreign tasks in its loop, so it gets a loop of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import kopf

from kubearq.operator.main import run_operator
from kubearq.operator.settings import OperatorSettings


@asynccontextmanager
async def operator_in_thread(settings: OperatorSettings, connection: kopf.ConnectionInfo, *,
                             identity: str = "solo") -> AsyncIterator[None]:
    """Run the operator until the block ends; then it must stop within 60 s, having raised nothing."""
    stop, failures = threading.Event(), list[BaseException]()

    def main() -> None:
        async def serve() -> None:
            stopping = asyncio.Event()
            watcher = asyncio.create_task(asyncio.to_thread(stop.wait))
            watcher.add_done_callback(lambda _: stopping.set())
            await run_operator(settings, connection, stop=stopping, identity=identity)
        try:
            asyncio.run(serve())
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=main, name=f"operator-{identity}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 60)
        assert not thread.is_alive(), "the operator did not stop"
        if failures:
            raise failures[0]
