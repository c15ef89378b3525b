"""A local HTTP server on 127.0.0.1 (a thread) serving images made in code, for download tests."""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from tests import corpus


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def image_files(seed: int = 5) -> dict[str, bytes]:
    """name -> bytes: JPEGs and PNGs of varied sizes, one CMYK JPEG, one grayscale PNG, one broken file."""
    files = {f"{k}.{ext}": data for k, data, ext in corpus.good_images(4, seed=seed)}
    files["cmyk.jpg"] = _encode(Image.new("CMYK", (120, 90), (10, 200, 30, 0)), "JPEG")
    files["gray.png"] = _encode(Image.new("L", (64, 80), 128), "PNG")
    files["broken.jpg"] = b"\xff\xd8\xff\xe0 this is not really a jpeg"
    return files


@contextmanager
def serve(files: dict[str, bytes]) -> Iterator[str]:
    """Serve `files` at http://127.0.0.1:PORT/NAME (any other path: 404); yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            data = files.get(self.path.lstrip("/"))
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="http-images", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
