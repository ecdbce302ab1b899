"""Baseline B: the minimal ingress a user writes from aiohttp's and aio-pika's docs.

One handler: parse with orjson, publish persistently with publisher confirms to a quorum queue,
answer 202. No spool, no access log, no metrics.

    python bench/baselines/minimal_ingress.py PORT AMQP_URL QUEUE
"""

import sys

import aio_pika
import orjson
from aiohttp import web


async def broker(app: web.Application):
    connection = await aio_pika.connect_robust(app["url"])
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue(app["queue"], durable=True, arguments={"x-queue-type": "quorum"})
    app["channel"] = channel
    yield
    await connection.close()


async def webhook(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        event = orjson.loads(body)["event"]
    except Exception:
        return web.json_response({"error": "bad webhook"}, status=400)
    await request.app["channel"].default_exchange.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, content_type="application/json",
                         type=event),
        routing_key=request.app["queue"])
    return web.json_response({"status": "accepted"}, status=202)


def main() -> None:
    port, url, queue = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    app = web.Application()
    app["url"], app["queue"] = url, queue
    app.cleanup_ctx.append(broker)
    app.router.add_post("/webhooks/hipcall", webhook)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
