"""The HTML pages of the `rsmclip` command (search hits, classifications): one self-contained file each,
the pictures embedded as data: URIs, no script."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

import rsmclip
from files import display


def thumbnail(path: Path, size: int = 224) -> str:
    """An image as a data: URI (JPEG, longer side at most `size`), so that a page needs no other file."""
    image = rsmclip.open_image(path)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def results_page(title: str, sections: list[tuple[str, list[tuple[Path, list[str]]]]]) -> str:
    """One self-contained HTML page (no script, no other file): per section (a query, or the images of a
    classification) a heading and a grid of cards, each an embedded thumbnail and its lines of text."""
    def card(image: Path, lines: list[str]) -> str:
        text = "".join(f"<div>{html.escape(display(line))}</div>" for line in lines)  # file names too
        return (f'<figure><img src="{thumbnail(image)}" alt="{html.escape(display(image))}">'
                f"<figcaption>{text}</figcaption></figure>")
    body = "".join(f"<section><h2>{html.escape(heading)}</h2><div class=grid>"
                   + "".join(card(image, lines) for image, lines in cards) + "</div></section>"
                   for heading, cards in sections)
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>"
            "body{font:14px system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}"
            "h1{font-size:20px}h2{font-size:16px;margin:24px 0 8px}"
            ".grid{display:flex;flex-wrap:wrap;gap:12px}"
            "figure{margin:0;width:180px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}"
            "img{width:180px;height:180px;object-fit:contain;background:#eee}"
            "figcaption div{overflow-wrap:anywhere}figcaption div:first-child{font-weight:600}"
            f"</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")
