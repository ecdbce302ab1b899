"""Ceiling: the same aiohttp app answering 202 without publishing anything.

    python bench/baselines/no_publish.py PORT
"""

import sys

import orjson
from aiohttp import web


async def webhook(request: web.Request) -> web.Response:
    orjson.loads(await request.read())
    return web.json_response({"status": "accepted"}, status=202)


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/webhooks/hipcall", webhook)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
