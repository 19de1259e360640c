"""A minimal AMQP 0-9-1 publisher on a plain socket, for what no client library will encode:
message properties as other clients put them on the wire (a short string that is not UTF-8, a
timestamp in microseconds, a header name that is not UTF-8). RabbitMQ forwards them as they are.

Each frame is built with pamqp, then its bytes are edited by the caller (``patch``) before they
are written; publishes are confirmed.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pamqp import commands, constants, frame, header, heartbeat
from pamqp.base import Frame
from pamqp.body import ContentBody

Patch = Callable[[bytes], bytes]
F = TypeVar("F", bound=Frame)


def _unchanged(raw: bytes) -> bytes:
    return raw


@dataclass
class RawPublisher:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(
        cls, *, host: str, port: int, vhost: str, user: str, password: str
    ) -> RawPublisher:
        reader, writer = await asyncio.open_connection(host, port)
        publisher = cls(reader, writer)
        writer.write(header.ProtocolHeader().marshal())
        await publisher._expect(commands.Connection.Start)
        publisher._send(
            commands.Connection.StartOk(
                client_properties={"connection_name": "raw-test-publisher"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
            ),
            channel=0,
        )
        tune = await publisher._expect(commands.Connection.Tune)
        publisher._send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
            ),
            channel=0,
        )
        publisher._send(commands.Connection.Open(virtual_host=vhost), channel=0)
        await publisher._expect(commands.Connection.OpenOk)
        publisher._send(commands.Channel.Open(), channel=1)
        await publisher._expect(commands.Channel.OpenOk)
        publisher._send(commands.Confirm.Select(), channel=1)
        await publisher._expect(commands.Confirm.SelectOk)
        return publisher

    async def publish(
        self,
        exchange: str,
        body: bytes,
        properties: commands.Basic.Properties,
        *,
        patch: Patch = _unchanged,
    ) -> None:
        """Publish one message (its content header's bytes through ``patch``), confirmed."""
        self._send(commands.Basic.Publish(exchange=exchange, routing_key=""), channel=1)
        content = frame.marshal(header.ContentHeader(0, len(body), properties), 1)
        edited = patch(content)
        assert len(edited) == len(content), "a patch must keep the frame's length"
        self.writer.write(edited)
        self.writer.write(frame.marshal(ContentBody(body), 1))
        await self.writer.drain()
        await self._expect(commands.Basic.Ack)

    async def close(self) -> None:
        self._send(
            commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0),
            channel=0,
        )
        try:
            async with asyncio.timeout(5):
                await self._expect(commands.Connection.CloseOk)
        finally:
            self.writer.close()

    def _send(self, method: Frame, *, channel: int) -> None:
        self.writer.write(frame.marshal(method, channel))

    async def _expect(self, kind: type[F]) -> F:
        while True:
            head = await self.reader.readexactly(constants.FRAME_HEADER_SIZE)
            _, _, size = struct.unpack(">BHI", head)
            rest = await self.reader.readexactly(size + 1)
            _, _, received = frame.unmarshal(head + rest)
            if isinstance(received, heartbeat.Heartbeat):
                continue
            if isinstance(received, kind):
                return received
            raise AssertionError(f"expected {kind.__name__}, got {received!r}")
