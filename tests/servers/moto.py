"""moto's S3 server on 127.0.0.1 (a real S3 endpoint for aiobotocore), with its requests counted."""

from __future__ import annotations

import logging
import re

import boto3
from moto.server import ThreadedMotoServer

from .ports import free_port

_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class MotoS3:
    """`MotoS3.start()`; `.url`, `.client()` (boto3), `.requests()` -> [(method, path, status)]."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=True)
        self._recorder = _Recorder()

    @classmethod
    def start(cls) -> MotoS3:
        server = cls()
        werkzeug = logging.getLogger("werkzeug")
        werkzeug.setLevel(logging.INFO)
        werkzeug.addHandler(server._recorder)
        server._server.start()
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def requests(self) -> list[tuple[str, str, int]]:
        found = []
        for line in self._recorder.lines:
            match = _REQUEST.search(line)
            if match:
                found.append((match["method"], match["path"], int(match["status"])))
        return found

    def stop(self) -> None:
        self._server.stop()
        logging.getLogger("werkzeug").removeHandler(self._recorder)
