"""Markdown the Prefect UI renders, figures embedded as data URIs."""

from __future__ import annotations

import base64


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_markdown(title: str, png: bytes, caption: str = "") -> str:
    """A figure as markdown with its PNG embedded: the Prefect UI renders data URIs."""
    return f"### {title}\n\n![{title}]({data_uri(png)})\n\n{caption}".rstrip() + "\n"
