"""What the dashboard's browser tests share: the served REST API with the admin token (to set
the scene and to check what the UI did), and signing in through the form."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from playwright.sync_api import Page, expect

# Playwright's wait for what a test expects to see.
TIMEOUT_MS = 5000


class Rest:
    """The served Conveyor's REST API with the admin token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def trigger(self, workflow: str, **body: Any) -> dict[str, Any]:
        return self.call("POST", f"/v1/workflows/{workflow}/runs", {"immediate": True, **body})

    def run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/workflow-runs/{run_id}")


def sign_in(page: Page, ui_server: Any, fragment: str = "#/runs") -> None:
    """Open the dashboard at `fragment` and sign in with the admin token through the form."""
    page.goto(f"{ui_server.base_url}/ui/{fragment}")
    page.get_by_label("API key").fill(ui_server.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("navigation", name="Sections", exact=True)).to_be_visible(timeout=TIMEOUT_MS)
