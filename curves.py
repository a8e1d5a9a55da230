"""curves.svg: a run's metrics.jsonl drawn as one panel per logged quantity (loss parts, learning rate,
logit scale, teacher temperature, validation mR), a plain-text SVG that any browser shows, without a
plotting library. `python train.py plot RUN_DIR` draws it; training draws it at the end of every run."""
from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

import files
from eval import recall
from rundir import RunError

# (metrics.jsonl key, panel title), one panel each when logged; "val" lines hold a validation result
CURVES = (("loss", "loss (CLIP + distill weight x distillation)"), ("clip", "CLIP loss"),
          ("distill", "self-distillation loss"), ("lr", "learning rate"), ("logit_scale", "logit scale"),
          ("teacher_temp", "teacher temperature"), ("val", "validation mR (val split)"))


PANEL_W, PANEL_H = 380, 220


PLOT_LIMIT = 1e12  # beyond it a logged value is a blow-up, not a curve


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise RunError(f"{path}: no such file; a run directory gets it from its first --log-every steps")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text ({e})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row, why = None, e.msg
        else:
            why = "expected a JSON object with an integer \"step\""
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise RunError(f"{path} line {number} is damaged ({why}): delete or fix that line")
        rows.append(row)
    return rows


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[tuple[float, str]]:
    """Round values (1, 2 or 5 x 10^k apart) from lo to hi, about `count` of them, with labels of the
    fewest significant digits that tell them apart (14.295 and 14.305 are not both "14.3")."""
    raw = (hi - lo) / count
    unit = 10 ** math.floor(math.log10(raw))
    gap = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
    values = [k * gap for k in range(math.ceil(lo / gap), math.floor(hi / gap) + 1)]
    digits = next(d for d in range(3, 17) if len({f"{v:.{d}g}" for v in values}) == len(values))
    return [(v, f"{v:.{digits}g}") for v in values]


def svg_panel(title: str, points: list[tuple[int, float]], off: list[tuple[int, float]], last_step: int,
              left: float, top: float) -> list[str]:
    """One quantity against the step: frame, ticks and labels on both axes, the curve as one polyline; the
    values it cannot draw (`off`) are named in red under the title."""
    x0, y0, w, h = left + 64, top + 30, PANEL_W - 84, PANEL_H - 74  # the plotting area
    marks = []
    if off:
        more = f" (+{len(off) - 3} more)" if len(off) > 3 else ""
        listed = ", ".join(f"step {s}: {v:.3g}" for s, v in off[:3]) + more
        marks = [f'<text x="{left + PANEL_W / 2:.1f}" y="{top + 32}" text-anchor="middle" fill="#c0392b">'
                 f'not drawn: {html.escape(listed)}</text>']
        y0 += 12
        h -= 12
    if not points:
        return [f'<text x="{left + PANEL_W / 2:.1f}" y="{top + 18}" text-anchor="middle" font-weight="bold">'
                f'{html.escape(title)}</text>', *marks]
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0  # a flat curve gets a band around it
    lo, hi = lo - pad, hi + pad

    def x(step):
        return x0 + w * step / last_step

    def y(value):
        return y0 + h * (hi - value) / (hi - lo)

    out = [f'<text x="{left + PANEL_W / 2:.1f}" y="{top + 18}" text-anchor="middle" font-weight="bold">'
           f'{html.escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>', *marks]
    for t, label in nice_ticks(lo, hi):
        out += [f'<line x1="{x0 - 4}" y1="{y(t):.1f}" x2="{x0 + w}" y2="{y(t):.1f}" stroke="#e6e6e6"/>',
                f'<text x="{x0 - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{label}</text>']
    for t, label in nice_ticks(0, last_step):
        out += [f'<line x1="{x(t):.1f}" y1="{y0 + h}" x2="{x(t):.1f}" y2="{y0 + h + 4}" stroke="#999"/>',
                f'<text x="{x(t):.1f}" y="{y0 + h + 16}" text-anchor="middle">{label}</text>']
    out.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 34}" text-anchor="middle">step</text>')
    coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    out.append(f'<polyline points="{coords}" fill="none" stroke="#1f5fa8" stroke-width="1.5"/>')
    if len(points) == 1:  # a polyline of one point draws nothing
        out.append(f'<circle cx="{x(points[0][0]):.1f}" cy="{y(points[0][1]):.1f}" r="3" fill="#1f5fa8"/>')
    return out


def drawable(value: float) -> bool:
    """A value a panel can scale to: a blow-up (inf, nan, a loss of 1e308) would leave every other point
    on one line, or give the SVG inf coordinates; it is marked in its panel instead."""
    return math.isfinite(value) and abs(value) <= PLOT_LIMIT


def ordered(key: str, points: list[tuple[int, float]], path: Path) -> list[tuple[int, float]]:
    """The points in step order, one per step (the last logged). A repeated or decreasing step means two
    runs wrote one file (or it was edited): say so rather than draw a zigzag."""
    back = next(((a, b) for (a, _), (b, _) in zip(points, points[1:]) if b <= a), None)
    if back:
        print(f"warning: {path}: {key} has repeated or decreasing steps ({back[1]} after {back[0]}): was the "
              "file written by two runs? Drawn: the last value logged for each step", file=sys.stderr)
    return sorted(dict(points).items())


def plot(run_dir: Path) -> Path:
    """RUN_DIR/curves.svg from RUN_DIR/metrics.jsonl: one panel per logged quantity of CURVES, a plain-text
    SVG that any browser shows (no plotting library)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    rows = read_metrics(run_dir / "metrics.jsonl")
    panels = []
    for key, title in CURVES:
        if key == "val":
            points = [(r["step"], recall(r["val"])) for r in rows if r.get("val")]
        else:
            points = [(r["step"], r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if points:
            points = ordered(key, points, run_dir / "metrics.jsonl")
            panels.append((title, [(s, v) for s, v in points if drawable(v)],
                           [(s, v) for s, v in points if not drawable(v)]))
    if not panels:
        raise RunError(f"{run_dir / 'metrics.jsonl'}: no logged steps to draw yet")
    last_step = max(1, *(s for _, points, off in panels for s, _ in points + off))
    width, height = 2 * PANEL_W, 40 + PANEL_H * math.ceil(len(panels) / 2)
    body = [f'<text x="12" y="24" font-size="15">{html.escape(str(run_dir))}: training curves</text>']
    for i, (title, points, off) in enumerate(panels):
        body += svg_panel(title, points, off, last_step, PANEL_W * (i % 2), 40 + PANEL_H * (i // 2))
    svg = "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                     f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
                     f'<rect width="{width}" height="{height}" fill="white"/>', *body, "</svg>", ""])
    path = run_dir / "curves.svg"
    files.atomic_write(path, lambda tmp: tmp.write_text(svg, encoding="utf-8"))
    return path
