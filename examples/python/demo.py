"""A Python service on switchboard, through the gateway: serves a handler, sends, emits,
requests, subscribes, and reads a handler's error.

    cargo run -p switchboard-gateway -- --listen 127.0.0.1:50051 &
    pip install grpcio grpcio-tools
    python3 examples/python/demo.py --target 127.0.0.1:50051

Ends with the line `ok: python sent, emitted, requested, subscribed and served` (exit 0), or
exits 1 naming what failed. Every wait is bounded.
"""

import argparse
import json
import queue
import sys
import threading
import time
import uuid

import gen

gen.ensure()

import grpc  # noqa: E402
from switchboard.v1 import envelope_pb2 as env_pb  # noqa: E402
from switchboard.v1 import switchboard_pb2 as pb  # noqa: E402
from switchboard.v1 import switchboard_pb2_grpc as rpc  # noqa: E402

STEP = 10.0  # seconds: the bound on every wait


def envelope(pattern: str, body) -> env_pb.Envelope:
    return env_pb.Envelope(
        pattern=pattern,
        payload=json.dumps(body).encode(),
        content_type="application/json",
    )


def body(env: env_pb.Envelope):
    return json.loads(env.payload)


class Serving:
    """Handlers of this service, fed by one Serve stream."""

    def __init__(self, stub, metadata, tag):
        self.answers = queue.Queue()
        self.events = queue.Queue()
        self.registered = threading.Event()
        self.error = None
        self.greet = f"py.greet.{tag}"
        self.signups = f"py.signups.{tag}"
        register = pb.ServeRequest(
            register=pb.ServeRegister(
                request_patterns=[self.greet],
                events=[pb.EventSubscription(pattern=self.signups, group="py-welcome")],
            )
        )
        self.answers.put(register)
        self.stream = stub.Serve(self._outgoing(), metadata=metadata)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _outgoing(self):
        while True:
            item = self.answers.get()
            if item is None:
                return
            yield item

    def _run(self):
        try:
            for msg in self.stream:
                if msg.HasField("registered"):
                    self.registered.set()
                elif msg.HasField("work"):
                    self.answers.put(self.handle(msg.work))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e
                self.registered.set()  # wakes whoever waits for the registration

    def handle(self, work: pb.Work) -> pb.ServeRequest:
        if work.kind == pb.ROUTE_KIND_EVENT:
            self.events.put(body(work.envelope))
            return pb.ServeRequest(result=pb.WorkResult(work_id=work.work_id, reply=env_pb.Envelope()))
        name = body(work.envelope).get("name", "")
        if not name:
            error = env_pb.ReplyError(code="invalid_name", message="a greeting needs a name")
            return pb.ServeRequest(result=pb.WorkResult(work_id=work.work_id, error=error))
        reply = envelope("", {"greeting": f"hello, {name}"})
        return pb.ServeRequest(result=pb.WorkResult(work_id=work.work_id, reply=reply))

    def close(self):
        self.answers.put(None)
        self.stream.cancel()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--token", default="")
    args = ap.parse_args()
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    tag = uuid.uuid4().hex[:8]

    channel = grpc.insecure_channel(args.target)
    grpc.channel_ready_future(channel).result(timeout=STEP)
    stub = rpc.SwitchboardStub(channel)

    # Serve: a request handler and an event handler, in this process.
    serving = Serving(stub, metadata, tag)
    if not serving.registered.wait(STEP):
        return fail("the Serve stream was not registered")
    if serving.error is not None:
        raise serving.error

    # Send: request-response, bounded by a gRPC deadline that travels with the request.
    reply = stub.Send(pb.SendRequest(envelope=envelope(serving.greet, {"name": "Ada"})), timeout=STEP, metadata=metadata)
    print("send ->", body(reply.reply))
    if body(reply.reply) != {"greeting": "hello, Ada"}:
        return fail(f"unexpected reply {reply.reply}")

    # A handler's error comes back as a status with its code in the trailers.
    try:
        stub.Send(pb.SendRequest(envelope=envelope(serving.greet, {"name": ""})), timeout=STEP, metadata=metadata)
        return fail("an empty name was greeted")
    except grpc.RpcError as e:
        trailers = dict(e.trailing_metadata() or [])
        print("send (no name) ->", e.code().name, trailers.get("sb-error-code"), e.details())
        if e.code() != grpc.StatusCode.UNKNOWN or trailers.get("sb-error-code") != "invalid_name":
            return fail("the handler's error was not readable")

    # Emit: fire-and-forget; our own event handler gets it.
    stub.Emit(pb.EmitRequest(envelope=envelope(serving.signups, {"user": "ada"})), timeout=STEP, metadata=metadata)
    event = serving.events.get(timeout=STEP)
    print("emit -> handled", event)

    # Request: returns a correlation id at once; replies arrive on one Replies stream.
    replies = stub.Replies(pb.RepliesRequest(), metadata=metadata, timeout=STEP * 3)
    first = next(replies)
    address = first.address
    waiting = {}
    for name in ["Grace", "Edsger", "Barbara"]:
        env = envelope(serving.greet, {"name": name})
        env.reply_to = address
        accepted = stub.Request(pb.RequestRequest(envelope=env, timeout_ms=int(STEP * 1000)), timeout=STEP, metadata=metadata)
        waiting[accepted.correlation_id] = name
    matched = 0
    for msg in replies:
        name = waiting.pop(msg.reply.correlation_id, None)
        if name is None:
            return fail(f"a reply nobody waits for: {msg.reply.correlation_id}")
        if body(msg.reply) != {"greeting": f"hello, {name}"}:
            return fail(f"request for {name} got {body(msg.reply)}")
        matched += 1
        if not waiting:
            break
    replies.cancel()
    print(f"request -> {matched} replies matched by correlation id")

    # Subscribe: a group of our own, each delivery acknowledged.
    orders = f"py.orders.{tag}"
    settles = queue.Queue()
    settles.put(pb.SubscribeRequest(subscription=pb.Subscription(kind=pb.ROUTE_KIND_EVENT, pattern=orders, group="py-billing")))

    def outgoing():
        while True:
            item = settles.get()
            if item is None:
                return
            yield item

    deliveries = stub.Subscribe(outgoing(), metadata=metadata, timeout=STEP * 3)
    if not next(deliveries).HasField("subscribed"):
        return fail("the subscription was not confirmed")
    for n in (1, 2):
        stub.Emit(pb.EmitRequest(envelope=envelope(orders, {"order": n})), timeout=STEP, metadata=metadata)
    got = []
    for msg in deliveries:
        got.append(body(msg.delivery.envelope)["order"])
        settles.put(pb.SubscribeRequest(settle=pb.Settle(delivery_id=msg.delivery.delivery_id, ack=True)))
        if len(got) == 2:
            break
    settles.put(None)
    deliveries.cancel()
    print("subscribe -> received and acknowledged", sorted(got))
    if sorted(got) != [1, 2]:
        return fail(f"expected orders 1 and 2, got {got}")

    serving.close()
    channel.close()
    print("ok: python sent, emitted, requested, subscribed and served")
    return 0


def fail(why: str) -> int:
    print(f"failed: {why}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    started = time.monotonic()
    try:
        code = main()
    except grpc.RpcError as e:
        print(f"failed: {e.code().name}: {e.details()}", file=sys.stderr)
        code = 1
    except queue.Empty:
        print(f"failed: nothing arrived within {STEP}s", file=sys.stderr)
        code = 1
    sys.exit(code)
