"""A TCP relay on loopback: 127.0.0.1:LISTEN forwards every connection to 127.0.0.1:TARGET.

scripts/brokers runs it in front of moto (`sqs-relay`) so that the restart case can take the
SNS/SQS endpoint away and bring it back while the queues keep their state: stopping the relay
cuts every connection and refuses new ones, which is what a client sees of an endpoint outage.

With a certificate and key it terminates TLS on LISTEN (`kafka-secure`: TLS in front of a
tansu that requires SASL, since tansu 0.6.0's own TLS options cannot be given together).

    python3 scripts/relay.py LISTEN TARGET [CERT KEY]
"""

import asyncio
import ssl
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


async def main(listen: int, target: int, tls: ssl.SSLContext | None) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(target, r, w), "127.0.0.1", listen, reuse_address=True, ssl=tls
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5):
        sys.exit("usage: relay.py LISTEN_PORT TARGET_PORT [CERT KEY]")
    context = None
    if len(sys.argv) == 5:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[3], sys.argv[4])
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), context))
