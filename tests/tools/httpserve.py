#!/usr/bin/env python3
"""A file server on 127.0.0.1 for flash's URL tests.

httpserve.py DIR PORT [--ranges] [--drop-at BYTES] [--log FILE]
               [--tls CERT KEY]

Serves DIR's files. With --ranges it honours `Range: bytes=N-` (206,
Content-Range, Accept-Ranges: bytes); without, it ignores Range and sends
no Accept-Ranges, as Python's own http.server does. With --drop-at, the
first whole GET of each file longer than BYTES sends its full
Content-Length, then only BYTES bytes, and closes the connection (a
dropped download). With --tls it speaks HTTPS with the PEM certificate
(chain) CERT and its key KEY. Every request is logged as
`METHOD PATH RANGE STATUS`.
"""

import argparse
import os
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = None
dropped = set()
lock = threading.Lock()


def log(line):
    if args.log:
        with lock, open(args.log, "a") as f:
            f.write(line + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = os.path.join(args.dir, self.path.lstrip("/").split("?")[0])
        rng = self.headers.get("Range")
        if not os.path.isfile(path):
            log(f"GET {self.path} {rng} 404")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = os.path.getsize(path)
        start = 0
        if args.ranges and rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
        status = 206 if start else 200
        log(f"GET {self.path} {rng} {status}")
        self.send_response(status)
        self.send_header("Content-Length", str(size - start))
        if args.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        limit = size - start
        with lock:
            drop = (
                args.drop_at is not None
                and start == 0
                and size > args.drop_at
                and path not in dropped
            )
            if drop:
                dropped.add(path)
                limit = args.drop_at
        with open(path, "rb") as f:
            f.seek(start)
            left = limit
            try:
                while left > 0:
                    b = f.read(min(left, 1 << 20))
                    if not b:
                        break
                    self.wfile.write(b)
                    left -= len(b)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
        if drop:
            log(f"DROP {self.path} at {limit}")
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("port", type=int)
    p.add_argument("--ranges", action="store_true")
    p.add_argument("--drop-at", type=int)
    p.add_argument("--log")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*args.tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
