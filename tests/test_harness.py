"""The suite's own harness: servers that tests start get ports nobody else is handed,
and a gateway counts as ready only once it holds its port itself."""

from __future__ import annotations

import http.server
import threading

import pytest

from support import Gateway, Processes, free_port


def test_ports_handed_out_are_distinct_and_free() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(port < 32768 for port in ports)  # never the kernel's ephemeral range


def test_a_gateway_whose_port_another_server_answers_on_is_not_ready(
    processes: Processes,
) -> None:
    """Once, two xdist workers were handed one port: the second gateway could not bind
    it and exited, and its readiness check got 200 from the first one's /healthz."""

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    other = http.server.HTTPServer(("127.0.0.1", port), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        gw = Gateway(processes.dispatch("gateway", "gateway", "--port", str(port)), port)
        with pytest.raises(RuntimeError, match="gateway exited early"):
            gw.wait_ready()
        assert "address already in use" in gw.proc.log()
    finally:
        other.shutdown()
        other.server_close()
