"""A TCP relay on loopback: 127.0.0.1:LISTEN forwards every connection to 127.0.0.1:TARGET.

scripts/brokers runs it in front of moto (`sqs-relay`) so that the restart case can take the
SNS/SQS endpoint away and bring it back while the queues keep their state: stopping the relay
cuts every connection and refuses new ones, which is what a client sees of an endpoint outage.

    python3 scripts/relay.py LISTEN TARGET
"""

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def relay(target: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def main(listen: int, target: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(target, r, w), "127.0.0.1", listen, reuse_address=True
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: relay.py LISTEN_PORT TARGET_PORT")
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
