"""Raw baseline consumer: aio-pika on uvloop, consume + publish-with-confirm + ack.

For each message of the ``--in`` quorum queue (prefetch as the gateway's default), publish a
receipt-sized reply to ``--out`` and wait for its confirm, then ack: the broker work of the
gateway's AMQP partner path and none of its checks. Prints ``READY`` once consuming; runs
until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage

REPLY = b'{"receipt": "' + b"r" * 700 + b'"}'


async def consume(args: argparse.Namespace) -> None:
    connection = await aio_pika.connect(args.url)
    consume_channel = await connection.channel()
    await consume_channel.set_qos(prefetch_count=args.prefetch)
    publish_channel = await connection.channel(publisher_confirms=True)
    queue = await consume_channel.get_queue(args.in_queue, ensure=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        await publish_channel.default_exchange.publish(
            aio_pika.Message(REPLY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=args.out_queue,
            mandatory=True,
        )
        await message.ack()

    await queue.consume(on_message)
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--in-queue", dest="in_queue", required=True)
    parser.add_argument("--out-queue", dest="out_queue", required=True)
    parser.add_argument("--prefetch", type=int, default=50)
    uvloop.run(consume(parser.parse_args()))


if __name__ == "__main__":
    main()
