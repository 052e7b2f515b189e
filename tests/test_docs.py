"""The API's documentation pages work offline: ``/docs`` (Swagger UI) and ``/redoc`` load
every script, style sheet and icon from the app itself, never from a CDN or another host."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from infra.settings import Settings


class Assets(HTMLParser):
    """The URLs a page loads: script sources, linked style sheets and icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(str(values["src"]))
        if tag == "link" and values.get("href"):
            self.urls.append(str(values["href"]))


def loaded_urls(html: str) -> list[str]:
    parser = Assets()
    parser.feed(html)
    return parser.urls


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """The real app on its embedded default (SQLite and artifacts under tmp_path)."""
    with TestClient(create_app(Settings(data_dir=tmp_path))) as c:
        yield c


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("/docs", {"javascript": 1, "css": 1}),  # swagger-ui-bundle.js and swagger-ui.css
        ("/redoc", {"javascript": 1}),  # redoc.standalone.js
    ],
)
def test_a_docs_page_loads_every_asset_from_the_app(
    client: TestClient, page: str, expected: dict[str, int]
) -> None:
    response = client.get(page)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    # Nothing is fetched from another host: no absolute URL appears in the page at all.
    assert re.findall(r"(?:https?:)?//[\w.-]+\.\w+", html) == []

    urls = loaded_urls(html)
    assert urls, html
    kinds: dict[str, int] = {}
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)  # without an API key, as a browser asks for it
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url  # the real file, not an empty answer
        kind = asset.headers["content-type"].split(";")[0].split("/")[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, count in expected.items():
        assert kinds.get(kind, 0) >= count, (kind, kinds)

    # and the page points the viewer at the app's own OpenAPI document
    assert "/openapi.json" in html
    assert client.get("/openapi.json").json()["info"]["title"] == "weightsmith"
