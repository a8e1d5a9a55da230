"""The HTML pages of the `rsmclip` command (search hits on scenes and pictures, classifications): one
self-contained file each, the pictures embedded as data: URIs, the hits on a scene drawn as SVG, no script."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

import rsmclip
from files import display
from search import scenes

STYLE = ("body{font:14px system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}"
         "h1{font-size:20px}h2{font-size:16px;margin:24px 0 8px}"
         ".grid{display:flex;flex-wrap:wrap;gap:12px}"
         "figure{margin:0;width:180px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}"
         "img{width:180px;height:180px;object-fit:contain;background:#eee}"
         "figcaption div{overflow-wrap:anywhere}figcaption div:first-child{font-weight:600}")


def thumbnail(path: Path, size: int = 224) -> str:
    """An image as a data: URI (JPEG, longer side at most `size`), so that a page needs no other file."""
    image = rsmclip.open_image(path)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    return data_uri(image)


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
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def scene_figure(hits: list[dict], preview: Image.Image) -> str:
    """A scene's preview with the hits on it as numbered rectangles (their footprints in the scene's pixel
    grid, so a rotated scene's preview, which is its pixel grid, shows them upright) and their scores."""
    info = hits[0]["info"]
    sx, sy = preview.width / info["width"], preview.height / info["height"]
    marks = []
    for h in hits:
        col, row, w, h_ = h["window"]
        x, y = col * sx, row * sy
        right = x > 0.8 * preview.width  # a label near the right edge runs leftwards, to stay on the page
        label = f'x="{x + w * sx - 3:.1f}" text-anchor="end"' if right else f'x="{x + 3:.1f}"'
        marks.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w * sx:.1f}" height="{h_ * sy:.1f}"/>'
                     f'<text {label} y="{y + 14:.1f}">#{h["rank"]} {h["score"]:.3f}</text>')
    name = html.escape(hits[0]["path"])
    return (f'<figure class=scene><div class=map><img src="{data_uri(preview)}" alt="{name}">'
            f'<svg viewBox="0 0 {preview.width} {preview.height}" preserveAspectRatio="none">{"".join(marks)}'
            f'</svg></div><figcaption><div>{name}</div><div>{info["crs"]}, {info["width"]:,} x '
            f'{info["height"]:,} px, {info["gsd_m"]:g} m per tile pixel</div></figcaption></figure>')


def search_page(title: str, hits: dict[str, list[dict]]) -> str:
    """The page of a search: per query, each scene with hits as a preview (from its overviews) with the hits
    drawn on it, then a card per hit: the tile as the model saw it, or the picture."""
    previews: dict = {}
    sections = []
    for query, best in hits.items():
        figures = []
        for path in dict.fromkeys(h["path"] for h in best if h["kind"] == "scene"):
            on = [h for h in best if h["path"] == path]
            if path not in previews:
                previews[path] = scenes.preview(on[0]["file"], on[0]["info"], 768)
            figures.append(scene_figure(on, previews[path]))
        cards = []
        for h in best:
            if h["kind"] == "scene":
                col, row, w, h_ = h["window"]
                src = data_uri(scenes.crop(h["file"], h["info"], h["window"], 224))
                lines = [f"#{h['rank']}  score {h['score']:.4f}", h["path"],
                         f"col {col} row {row}, {w} x {h_} px"]
            else:
                src, lines = thumbnail(h["file"]), [f"#{h['rank']}  score {h['score']:.4f}", h["path"]]
            text = "".join(f"<div>{html.escape(display(line))}</div>" for line in lines)
            cards.append(f'<figure><img src="{src}" alt="{html.escape(h["path"])}"><figcaption>{text}'
                         "</figcaption></figure>")
        sections.append(f"<section><h2>{html.escape(query)}</h2>{''.join(figures)}<div class=grid>"
                        f"{''.join(cards)}</div></section>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{STYLE}"
            ".scene{width:auto;max-width:780px;margin-bottom:12px}.map{position:relative;line-height:0}"
            ".map img{width:100%;height:auto;object-fit:fill}"
            ".map svg{position:absolute;left:0;top:0;width:100%;height:100%}"
            "rect{fill:none;stroke:#ff0;stroke-width:2;vector-effect:non-scaling-stroke}"
            "text{fill:#ff0;font:bold 13px system-ui,sans-serif;paint-order:stroke;stroke:#000;"
            "stroke-width:3px}"
            f"</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")
