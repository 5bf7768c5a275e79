"""A plain HTTP receiver for webhook tests: records every JSON body, can refuse the first few."""

from __future__ import annotations

import json
from typing import Any

from tests.support.loopback_http import LoopbackServer, QuietHandler


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[Any] = []
        self.refused = 0
        self.fail_first = fail_first
        outer = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if outer.refused < outer.fail_first:
                    outer.refused += 1
                    self.send_response(503)
                else:
                    outer.bodies.append(json.loads(body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = LoopbackServer(Handler)
        self.url = f"{self.server.url}/hook"

    def close(self) -> None:
        self.server.close()
