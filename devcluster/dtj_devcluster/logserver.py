"""The kubelet's log endpoint, so `kubectl logs` works for pods on executing nodes.

The API server proxies `kubectl logs` to https://<node InternalIP>:<kubelet
port>/containerLogs/<namespace>/<pod>/<container>; the executing nodes
advertise this server (127.0.0.1, a self-signed certificate, which the API
server accepts without --kubelet-certificate-authority). `follow` streams
until the container's log stops growing and its process is gone.
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LogPath = Callable[[str, str, str], Path | None]


def tail_lines(data: bytes, n: int | None) -> bytes:
    if n is None:
        return data
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:]) if n > 0 else b""


class LogServer:
    def __init__(self, find: LogPath, directory: Path) -> None:
        self.find = find
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "kubelet.crt", directory / "kubelet.key"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=dtj-node-agent",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        server = self
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container>")
                    return
                path = server.find(parts[1], parts[2], parts[3])
                if path is None or not path.exists():
                    self.send_error(404, f"no log for {parts[1]}/{parts[2]}/{parts[3]}")
                    return
                q = urllib.parse.parse_qs(url.query)
                n = int(q["tailLines"][0]) if "tailLines" in q else None
                follow = q.get("follow", ["false"])[0] == "true"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                with open(path, "rb") as f:
                    self.wfile.write(tail_lines(f.read(), n))
                    self.wfile.flush()
                    idle = 0.0
                    while follow and idle < 5.0:  # the file stops growing once the pod is gone
                        chunk = f.read()
                        if chunk:
                            idle = 0.0
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        else:
                            idle += 0.2
                            time.sleep(0.2)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.httpd.shutdown()
