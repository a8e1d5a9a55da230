"""Where a hit is on Earth: a tile's footprint (its window's outline through the scene's geotransform, the
edges densified so that they stay true after reprojection), GeoJSON as RFC 7946 asks and QGIS reads
(EPSG:4326 longitude, latitude; counter-clockwise outer rings; at most 7 decimals; no `crs` member) and the
same hits in each scene's own CRS, and non-maximum suppression of overlapping tiles."""
from __future__ import annotations

import json

from search.scenes import rasterio

DENSIFY = 16  # points per footprint edge: a straight edge in UTM is a curve in longitude and latitude
DECIMALS = 7  # RFC 7946 section 11.2: about 1 cm; more is noise


# ----------------------------------------------------------------------------- footprints

def footprint(transform: list[float], window: tuple[int, int, int, int], densify: int = DENSIFY
              ) -> tuple[list[float], list[float]]:
    """The window's outline in the scene's CRS: xs, ys of a closed ring (last point = first), `densify`
    points per edge, corners in the order top-left, bottom-left, bottom-right, top-right of the pixel grid."""
    a, b, c, d, e, f = transform
    col, row, w, h = window
    corners = [(col, row), (col, row + h), (col + w, row + h), (col + w, row)]
    pixels = [(x0 + (x1 - x0) * k / densify, y0 + (y1 - y0) * k / densify)
              for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]) for k in range(densify)]
    pixels.append(pixels[0])
    return [a * x + b * y + c for x, y in pixels], [d * x + e * y + f for x, y in pixels]


def counter_clockwise(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """The ring turned counter-clockwise (positive shoelace area) if it is not: RFC 7946's right-hand rule.
    The pixel order of footprint() is counter-clockwise on a north-up map; a south-up or mirrored
    geotransform turns it around."""
    area = sum(x0 * y1 - x1 * y0 for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]))
    return (xs[::-1], ys[::-1]) if area < 0 else (xs, ys)


def to_lonlat(crs: str, xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Points of a CRS in EPSG:4326 as longitude, latitude (GDAL's traditional axis order)."""
    if crs == "EPSG:4326":
        return list(xs), list(ys)
    lon, lat = rasterio().warp.transform(crs, "EPSG:4326", xs, ys)
    return list(lon), list(lat)


# ----------------------------------------------------------------------------- GeoJSON

def feature(hit: dict, xs: list[float], ys: list[float]) -> dict:
    xs, ys = counter_clockwise(xs, ys)
    ring = [[round(x, DECIMALS), round(y, DECIMALS)] for x, y in zip(xs, ys)]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": hit}


def hit_properties(hit: dict) -> dict:
    """Every feature's properties, always these and always of one type each (QGIS makes a column of each
    and types it from the values)."""
    col, row, w, h = hit["window"]
    xs, ys = footprint(hit["transform"], hit["window"], 1)
    return {"rank": int(hit["rank"]), "score": float(hit["score"]), "query": str(hit["query"]),
            "model": str(hit["model"]), "scene": str(hit["scene"]), "col_off": int(col), "row_off": int(row),
            "width": int(w), "height": int(h), "crs": str(hit["crs"]), "minx": float(min(xs)),
            "miny": float(min(ys)), "maxx": float(max(xs)), "maxy": float(max(ys)),
            "gsd_m": float(hit["gsd_m"]), "valid_frac": round(float(hit["valid_frac"]), 4)}


def geojson(hits: list[dict]) -> str:
    """An RFC 7946 FeatureCollection in EPSG:4326 of the hits of scenes (one Polygon per hit)."""
    features = []
    for hit in hits:
        xs, ys = footprint(hit["transform"], hit["window"])
        features.append(feature(hit_properties(hit), *to_lonlat(hit["crs"], xs, ys)))
    return json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False) + "\n"


def geojson_native(hits: list[dict], crs: str) -> str:
    """The hits of scenes in one CRS, in that CRS, for QGIS users who work in it: GeoJSON with the `crs`
    member of its 2008 specification, which GDAL (so QGIS) reads; RFC 7946 itself allows EPSG:4326 only."""
    features = [feature(hit_properties(hit), *footprint(hit["transform"], hit["window"])) for hit in hits
                if hit["crs"] == crs]
    name = rasterio().crs.CRS.from_string(crs).to_string()
    return json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": name}},
                       "features": features}, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- overlapping hits

def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two windows of one scene. An affine map keeps ratios of areas, so this is
    also the IoU of their footprints in the scene's CRS, rotated grids included."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def suppress(hits: list[dict], threshold: float) -> list[dict]:
    """Greedy non-maximum suppression, best score first: a hit whose footprint overlaps a better hit of the
    same scene by more than `threshold` IoU is dropped. Hits of different scenes never suppress each other
    (two scenes of one place are two views of it)."""
    kept: list[dict] = []
    for hit in sorted(hits, key=lambda h: -h["score"]):
        if "window" not in hit or not any(k.get("scene") == hit["scene"] and "window" in k
                                          and iou(k["window"], hit["window"]) > threshold for k in kept):
            kept.append(hit)
    return kept
