"""One plain HTTP webhook receiver for the tests of everything the server notifies (alerts,
the retrain webhook): it answers the statuses it is scripted to, then 200, and keeps every
JSON body it got with the status it answered."""

from __future__ import annotations

import json
from typing import Any

from tests.support.loopback_http import LoopbackServer, QuietHandler


class Receiver:
    def __init__(self, script: list[int] | None = None) -> None:
        self.script = list(script or [])
        self.bodies: list[Any] = []  # every body received, refused ones included
        self.statuses: list[int] = []  # what each was answered, in order
        outer = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                status = outer.script.pop(0) if outer.script else 200
                outer.bodies.append(body)
                outer.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = LoopbackServer(Handler)
        self.url = f"{self.server.url}/hook"

    @property
    def accepted(self) -> list[Any]:
        """The bodies answered with a 2xx: what a receiver took in."""
        return [b for b, s in zip(self.bodies, self.statuses, strict=True) if 200 <= s < 300]

    @property
    def refused(self) -> int:
        return sum(1 for s in self.statuses if not 200 <= s < 300)

    def close(self) -> None:
        self.server.close()
