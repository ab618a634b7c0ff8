"""A small HTTP client for the CLI commands that talk to a running gateway."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kefu.shared.config import admin_token

RUNTIME_FILE = "runtime.json"


class Client:
    def __init__(self, base: str, token: str) -> None:
        self.base = base.rstrip("/")
        self.token = token

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Client:
        """The gateway of ``--url``, else the one `kefu up` recorded in the data dir, else :8080."""
        base = args.url
        if not base:
            try:
                runtime = json.loads((Path(args.data_dir) / RUNTIME_FILE).read_text())
                base = runtime["http_url"]
            except (OSError, ValueError, KeyError):
                base = "http://127.0.0.1:8080"
        return cls(base, admin_token(Path(args.data_dir)))

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"null")
            except ValueError:
                return exc.code, {"error": {"code": "http_error", "message": str(exc)}}
        except (urllib.error.URLError, OSError) as exc:
            return 0, {"error": {"code": "unavailable", "message": f"cannot reach {self.base}: {exc}"}}


def fail(status: int, body: object) -> int:
    """Print the gateway's error answer for the CLI user; the exit status (1)."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    print(f"error: {err.get('message') or status} ({err.get('code', 'http_error')})", file=sys.stderr)
    return 1
