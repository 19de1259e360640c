"""A loopback TCP relay for outage tests: cut and restore the path to a real server
(PostgreSQL, RabbitMQ) without touching the server itself."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """A loopback TCP relay to a server that a test can cut (drop every connection and
    refuse new ones), black-hole (keep every connection open and deliver nothing, as a
    firewall dropping packets does), stall (hold every byte until ``flow``, as TCP does
    across a short silence: nothing is lost) and restore, without touching the real
    server."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target_host = target_host
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0
        #: bytes are read and dropped instead of passed on, both ways
        self.black_hole = False
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self._target_host, self._target_port
            )
        except OSError:
            writer.close()
            return
        tasks = {
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        }
        self._pipes |= tasks
        for task in tasks:
            task.add_done_callback(self._pipes.discard)

    def stall(self) -> None:
        """Hold what either side sends, both ways, until ``flow``."""
        self._flowing.clear()

    def flow(self) -> None:
        """Deliver what was held, and what comes, again."""
        self._flowing.set()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                if self.black_hole:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()
            with contextlib.suppress(ConnectionError, OSError):
                await dst.wait_closed()
