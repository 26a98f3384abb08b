"""`log_format = "json"`: every line a running server writes is one JSON object with time, level,
logger and message, plus the fields a line carries (an upstream's name and kind of failure, an
access line's method, path and status); a /web/ URL's signed query never reaches the log."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import httpx
import pytest

from tests.servers.ports import free_port
from tests.servers.recorder import Recorder

pytestmark = pytest.mark.real

SIGNATURE = "X-Amz-Signature=" + "5ec7e7" * 10


def test_json_logs_are_one_object_per_line_with_fields_and_no_signed_query(pullthrough) -> None:  # type: ignore[no-untyped-def]
    origin = Recorder({"/models/weights.bin": (200, {"ETag": '"v1"', "Content-Type": "application/octet-stream"}, b"w" * 4096)})
    try:
        pt = pullthrough(
            [{"name": "down.test", "url": f"http://127.0.0.1:{free_port()}"}],
            log_format="json", access_log=True, web={"allow": [f"{origin.url}/models/"]},
        )
        signed = httpx.get(f"{pt.url}/web/{origin.url}/models/weights.bin?{SIGNATURE}", timeout=30)
        assert signed.status_code == 200 and signed.content == b"w" * 4096
        assert any(SIGNATURE in path for path in origin.paths)  # the query did go to the origin
        assert httpx.get(f"{pt.url}/v2/down.test/library/app/manifests/1", timeout=60).status_code == 503
        pt.stop()
    finally:
        origin.close()

    text = pt.log_text()
    assert SIGNATURE not in text and "5ec7e7" not in text
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        when = datetime.fromisoformat(record["time"])
        assert record["time"].endswith("Z") and when.utcoffset() == timedelta(0), record["time"]
    assert any(r["logger"] == "uvicorn.error" for r in records) and any(" serving " in r["message"] for r in records), records
    access = [r for r in records if r["logger"] == "uvicorn.access" and r.get("path", "").startswith("/web/")]
    assert [(r["method"], r["status"]) for r in access] == [("GET", 200)], access
    assert access[0]["path"].endswith("/models/weights.bin"), access  # the query cut off
    down = [r for r in records if r.get("upstream") == "oci:down.test"]
    assert [(r["level"], r["kind"]) for r in down] == [("WARNING", "refused")], down
    assert down[0]["message"].startswith("upstream oci:down.test down: refused: ")
