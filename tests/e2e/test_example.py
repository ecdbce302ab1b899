"""The README's "Write your own consumer" example, run as written against a stand-in CRM."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import ROOT, payload, post_webhook, wait_until


def test_the_crm_example_stores_each_finished_call(launch, broker):
    received, statuses = [], [503, 200]  # the CRM is down once, then takes the record

    class CRMStandIn(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(statuses.pop(0) if statuses else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CRMStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = (ROOT / "examples" / "crm.toml").read_text()
        config = config.replace("http://127.0.0.1:9000/calls", f"http://127.0.0.1:{server.server_port}/calls")
        config = config.replace('["5s", "1m", "10m"]', '["200ms"]')
        ingress = launch("serve", broker, config, wait="/readyz")
        worker = launch("work", broker, config, env={"PYTHONPATH": str(ROOT / "examples")})
        _, _, answer = post_webhook(ingress, payload("call_hangup"))
        wait_until(lambda: len(received) == 2, what="the record, retried once")
        assert received[1] == {
            "id": answer["id"], "call": "2483a75a-56a2-41f1-991b-92b1667e324a", "from": "+902582440032",
            "to": "+4440333", "duration": 0, "ended_at": "2024-11-17T10:41:06Z",
        }
        assert [l["consumers"] for l in worker.logs() if l.get("msg") == "consuming"] == [["crm"]]  # hipcall is off
        assert broker.count("hipcall.call_hangup") is None  # so nobody declared its queue
        assert worker.stop() == 0
        assert [(l["handled"], l["consumer"]) for l in worker.logs() if l.get("msg") == "handled_summary" and l["consumer"] == "crm"] == [(1, "crm")]
    finally:
        server.shutdown()
