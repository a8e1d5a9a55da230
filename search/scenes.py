"""Georeferenced scenes (GeoTIFF, COG) tiled on the fly: what a scene is (its CRS, geotransform, ground
sampling distance, bands, mask and stretch), the tile grid over it, and each tile read by window only, so
that memory never grows with the scene. rasterio (GDAL) is imported on first use: `import rsmclip`, train.py
and eval.py never load it.

The grid is the field's (TorchGeo's GridGeoSampler after its fixes, GeoDeep): anchored at the scene's
top-left pixel, the same stride everywhere, and the tiles at the right and bottom edges read past the edge
and padded as nodata, never shifted inward (a shifted last tile is counted twice and breaks the stride)."""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from files import RsmclipError, display

SCENE_SUFFIXES = {".tif", ".tiff"}  # the rasters a folder search asks GDAL about (GeoTIFF, COG)
PREVIEW = 1024  # the long side, in pixels, of a scene's preview and of the read its stretch is taken from
STRETCH_PERCENTILES = (1, 99)  # as files.stretch, but once per scene (tiles of one scene must compare)
WGS84 = (6378137.0, 0.00669437999014)  # semi-major axis (m) and first eccentricity squared


# ----------------------------------------------------------------------------- the tiling settings

@dataclass(frozen=True)
class Tiling:
    """How scenes are cut (the command's --tile, --overlap, --gsd, --min-valid, --bands): an index holds
    the tiles of one tiling, and another tiling is another index."""
    tile: int  # output pixels per side (the model's input size by default)
    overlap: float = 0.0  # share of a tile that the next one covers again, 0 <= overlap < 1
    gsd: Optional[float] = None  # metres per output pixel; None keeps each scene's own pixels
    min_valid: float = 0.5  # tiles with a smaller share of valid pixels are not indexed
    bands: Optional[tuple[int, ...]] = None  # 1-based, one (grey) or three (red, green, blue)

    def as_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------- what a scene is

GDAL_CACHE_MB = "128"  # GDAL's block cache (default 5% of the memory): tiles are read row by row, and a
# few rows of blocks are all that is read again; the user's GDAL_CACHEMAX wins


def rasterio():
    """rasterio, imported on first use (it carries GDAL: seconds to import, and the library needs none)."""
    os.environ.setdefault("GDAL_CACHEMAX", GDAL_CACHE_MB)
    import rasterio as module
    import rasterio.crs
    import rasterio.enums
    import rasterio.errors
    import rasterio.warp
    import rasterio.windows  # noqa: F401  (the submodules used here, loaded with it)
    return module


def open_raster(path: Path):
    """A GDAL dataset, or RsmclipError naming the file and GDAL's reason (truncated, not a raster)."""
    rio = rasterio()
    try:
        return rio.open(path)
    except rio.errors.RasterioIOError as e:
        raise RsmclipError(f"{display(path)}: cannot read it as a raster ({str(e)[:200]})") from None


GEOKEYS = 34735  # the GeoTIFF tag that holds a CRS
SIDECARS = (".aux.xml", ".tfw", ".tifw", ".wld")  # where GDAL also finds a georeference


def is_scene(path: Path) -> bool:
    """A raster with a CRS and a geotransform, which is tiled; any other picture is searched whole. A TIFF
    without GeoTIFF keys or a sidecar file is a picture without starting GDAL (a folder of plain TIFFs
    is listed at PIL's speed)."""
    if path.suffix.lower() not in SCENE_SUFFIXES:
        return False
    try:
        with Image.open(path) as image:
            plain = GEOKEYS not in getattr(image, "tag_v2", {})
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        plain = False  # PIL cannot tell (BigTIFF, a damaged header): GDAL decides
    if plain and not any(Path(f"{path}{ext}").exists() or path.with_suffix(ext).exists() for ext in SIDECARS):
        return False
    with open_raster(path) as ds:
        return ds.crs is not None and not ds.transform.is_identity


def metres_per_unit(crs, lat: float) -> tuple[float, float]:
    """Metres per CRS unit along x and y at latitude `lat`: a projected CRS's linear unit, or for a
    geographic CRS (degrees) the WGS84 ellipsoid's radii of curvature there (east-west shrinks with
    cos(lat), north-south does not: pixels square in degrees are not square on the ground)."""
    if crs.is_geographic:
        a, e2 = WGS84
        phi = math.radians(lat)
        w = 1 - e2 * math.sin(phi) ** 2
        prime, meridian = a / math.sqrt(w), a * (1 - e2) / w ** 1.5
        return math.radians(1) * prime * math.cos(phi), math.radians(1) * meridian
    factor = crs.linear_units_factor[1]
    return factor, factor


class SceneSkipped(RsmclipError):
    """A scene that gives no tile at this tiling (smaller than one tile): skipped and counted."""


def describe(path: Path, tiling: Tiling) -> dict:
    """What tiling a scene needs, read from its header (and a small decimated read for the stretch of a
    16-bit or float scene): CRS, geotransform, size, bands, ground sampling distance in metres, the window
    (in the scene's own pixels) of one tile and the stride, and each band's stretch. A JSON-able dict,
    kept in the index beside the scene's tiles."""
    try:
        return describe_open(path, tiling)
    except rasterio().errors.RasterioIOError as e:  # a header that opens, blocks that do not (truncated)
        raise RsmclipError(f"{display(path)}: cannot read it as a raster ({str(e)[:200]})") from None


def describe_open(path: Path, tiling: Tiling) -> dict:
    """describe() of a scene whose reads may raise GDAL's own errors."""
    with open_raster(path) as ds:
        a, b, c, d, e, f = tuple(ds.transform)[:6]
        bands, alpha = pick_bands(ds, tiling.bands, path)
        centre_y = d * ds.width / 2 + e * ds.height / 2 + f
        if ds.crs.is_geographic:
            lat = centre_y
        else:
            lat = rasterio().warp.transform(ds.crs, "EPSG:4326", [a * ds.width / 2 + b * ds.height / 2 + c],
                                            [centre_y])[1][0]
        mx, my = metres_per_unit(ds.crs, lat)
        # a pixel's sides in metres: the columns of the geotransform (a rotated or sheared grid too)
        px, py = math.hypot(a * mx, d * my), math.hypot(b * mx, e * my)
        scale_x, scale_y = ((tiling.gsd / px, tiling.gsd / py) if tiling.gsd else (1.0, 1.0))
        win_w, win_h = max(1, round(tiling.tile * scale_x)), max(1, round(tiling.tile * scale_y))
        if win_w > ds.width or win_h > ds.height:
            at = f" at --gsd {tiling.gsd:g}" if tiling.gsd else ""
            raise SceneSkipped(f"{ds.width} x {ds.height} pixels, smaller than one tile ({win_w} x {win_h} "
                               f"of its pixels for --tile {tiling.tile}{at}): use a smaller --tile")
        info = {"crs": ds.crs.to_string(), "transform": [a, b, c, d, e, f], "width": ds.width,
                "height": ds.height, "bands": list(bands), "dtype": ds.dtypes[bands[0] - 1],
                "window": [win_w, win_h], "stride": [max(1, round(win_w * (1 - tiling.overlap))),
                                                     max(1, round(win_h * (1 - tiling.overlap)))],
                "gsd_m": round((px * win_w + py * win_h) / (2 * tiling.tile), 6),
                "alpha": alpha, "tiled": bool(ds.profile.get("tiled"))}
        info["stretch"] = scene_stretch(ds, info) if info["dtype"] != "uint8" else None
    return info


def pick_bands(ds, bands: Optional[tuple[int, ...]], path: Path) -> tuple[tuple[int, ...], bool]:
    """The bands read as red, green, blue (one band: grey), and whether the scene has an alpha band (which
    is never read as colour: it is the mask). Default: the bands whose colour interpretation is red, green
    and blue, else the first three that are not alpha, else one grey band."""
    ci = rasterio().enums.ColorInterp
    interp = list(ds.colorinterp)
    alpha = ci.alpha in interp
    if bands is not None:
        if max(bands) > ds.count:
            raise RsmclipError(f"--bands {','.join(map(str, bands))}: {display(path)} has {ds.count} band"
                               f"{'s' if ds.count > 1 else ''}")
        return bands, alpha
    if all(c in interp for c in (ci.red, ci.green, ci.blue)):
        return tuple(interp.index(c) + 1 for c in (ci.red, ci.green, ci.blue)), alpha
    data = [i + 1 for i, c in enumerate(interp) if c != ci.alpha]
    if len(data) >= 3:
        return tuple(data[:3]), alpha
    if len(data) == 1:
        return (data[0],), alpha
    raise RsmclipError(f"{display(path)}: {len(data)} data bands and none of them red, green or blue: say "
                       "which to read with --bands (e.g. --bands 1 for grey, --bands 1,2,2 as colour)")


def scene_stretch(ds, info: dict) -> list[list[float]]:
    """Per band, the 1st and 99th percentile of the scene's valid, finite values, from one decimated read
    of the whole scene (through its overviews where it has them): [[lo, hi], ...]. Taken once per scene,
    so that every tile of it is mapped to 8 bits the same way."""
    scale = min(1.0, PREVIEW / max(ds.width, ds.height))
    shape = (max(1, round(ds.height * scale)), max(1, round(ds.width * scale)))
    values, valid = read_window(ds, info, (0, 0, ds.width, ds.height), shape)
    out = []
    for band in values:
        good = band[valid & np.isfinite(band)]
        out.append([float(v) for v in np.percentile(good, STRETCH_PERCENTILES)] if good.size else [0.0, 0.0])
    return out


# ----------------------------------------------------------------------------- the grid and one tile

def grid(info: dict) -> list[tuple[int, int, int, int]]:
    """Every tile's window (col_off, row_off, width, height) in the scene's pixels, row by row from the
    top-left corner; the last column and row reach past the edge rather than shift inward."""
    (w, h), (sx, sy) = info["window"], info["stride"]
    cols = 1 + max(0, math.ceil((info["width"] - w) / sx))
    rows = 1 + max(0, math.ceil((info["height"] - h) / sy))
    return [(i * sx, j * sy, w, h) for j in range(rows) for i in range(cols)]


def read_window(ds, info: dict, window: tuple[int, int, int, int], shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The selected bands of a window, resampled to `shape` (rows, cols), as float32 [bands, rows, cols],
    and its mask of valid pixels [rows, cols]: valid where every band is valid by the dataset's own mask
    (nodata value, alpha band or internal mask) and finite. The part of the window past the scene's edge
    is not read: it stays 0 and invalid (padding)."""
    rio = rasterio()
    col, row, w, h = window
    bands = info["bands"]
    values = np.zeros((len(bands), *shape), np.float32)
    valid = np.zeros(shape, bool)
    c0, r0, c1, r1 = max(col, 0), max(row, 0), min(col + w, info["width"]), min(row + h, info["height"])
    if c1 <= c0 or r1 <= r0:
        return values, valid
    sy, sx = shape[0] / h, shape[1] / w  # output pixels per scene pixel
    o0, o1 = round((r0 - row) * sy), round((c0 - col) * sx)
    oh, ow = max(1, round((r1 - row) * sy) - o0), max(1, round((c1 - col) * sx) - o1)
    part = rio.windows.Window(c0, r0, c1 - c0, r1 - r0)
    smaller = oh < r1 - r0 or ow < c1 - c0
    how = rio.enums.Resampling.average if smaller else rio.enums.Resampling.bilinear
    if (oh, ow) == (r1 - r0, c1 - c0):
        how = rio.enums.Resampling.nearest  # no resampling: the pixels as stored
    data = ds.read(bands, window=part, out_shape=(len(bands), oh, ow), resampling=how, masked=False)
    masks = ds.read_masks(bands, window=part, out_shape=(len(bands), oh, ow),
                          resampling=rio.enums.Resampling.nearest)
    values[:, o0:o0 + oh, o1:o1 + ow] = data
    good = (masks > 0).all(0)
    if data.dtype.kind == "f":
        good &= np.isfinite(data).all(0)
    valid[o0:o0 + oh, o1:o1 + ow] = good
    return values, valid


def to_rgb8(values: np.ndarray, valid: np.ndarray, info: dict) -> np.ndarray:
    """[bands, rows, cols] -> [rows, cols, 3] uint8: 8-bit data as it is, other data through the scene's
    stretch; invalid pixels (nodata, padding) black; one band as grey."""
    if info["stretch"] is None:
        out = np.clip(values, 0, 255)
    else:
        out = np.zeros_like(values)
        for i, (lo, hi) in enumerate(info["stretch"]):
            if hi > lo:
                out[i] = np.clip((values[i] - lo) * (255.0 / (hi - lo)), 0, 255)
    out = np.where(valid & np.isfinite(out).all(0), np.nan_to_num(out), 0)
    out = np.round(out).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def read_tile(ds, info: dict, window: tuple[int, int, int, int], size: int) -> tuple[np.ndarray, float]:
    """One tile as [size, size, 3] uint8 and its share of valid pixels (padding counts as invalid)."""
    values, valid = read_window(ds, info, window, (size, size))
    return to_rgb8(values, valid, info), float(valid.mean())


class Tiles(torch.utils.data.Dataset):
    """The tiles of many scenes as preprocessed tensors, read by DataLoader workers while the model
    encodes: items are (scene path, scene info, window); each worker opens a scene once. Each item is
    (pixels, valid share, kept, GDAL's message if the window cannot be read): a tile below --min-valid is
    read (its mask decides) but not kept, so it is never encoded; an unreadable one (a truncated file) is
    reported by the main process, never raised in a worker."""

    def __init__(self, items: list[tuple[Path, dict, tuple]], preprocess, size: int, min_valid: float):
        self.items, self.preprocess, self.size, self.min_valid = items, preprocess, size, min_valid
        self.open: dict = {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, info, window = self.items[i]
        blank = torch.zeros(3, self.preprocess.size, self.preprocess.size)
        try:
            if path not in self.open:
                self.open = {path: open_raster(path)}  # items run scene by scene: keep one open
            rgb, valid = read_tile(self.open[path], info, window, self.size)
        except (rasterio().errors.RasterioIOError, RsmclipError) as e:
            return blank, 0.0, False, str(e).splitlines()[0][:200] or type(e).__name__
        if valid < self.min_valid or valid == 0:
            return blank, valid, False, ""
        return self.preprocess(Image.fromarray(rgb, "RGB")), valid, True, ""


# ----------------------------------------------------------------------------- pictures of a scene

def preview(path: Path, info: dict, size: int = PREVIEW) -> Image.Image:
    """The whole scene at most `size` pixels on its long side (GDAL reads it through the overviews where
    the file has them), stretched as its tiles are, nodata black."""
    scale = min(1.0, size / max(info["width"], info["height"]))
    shape = (max(1, round(info["height"] * scale)), max(1, round(info["width"] * scale)))
    with open_raster(path) as ds:
        values, valid = read_window(ds, info, (0, 0, info["width"], info["height"]), shape)
    return Image.fromarray(to_rgb8(values, valid, info), "RGB")


def crop(path: Path, info: dict, window: tuple[int, int, int, int], size: int) -> Image.Image:
    """One tile as the model saw it (before its resize to the model's input), for a page."""
    with open_raster(path) as ds:
        return Image.fromarray(read_tile(ds, info, window, size)[0], "RGB")


def note_untiled(path: Path, info: dict):
    """GeoDeep's advice: a large scene stored in strips is read row band by row band for every tile."""
    if not info["tiled"] and info["width"] * info["height"] > 4096 ** 2:
        print(f"note: {display(path)} is not internally tiled: windowed reads are slower (gdal_translate "
              "-co TILED=YES, or -of COG, makes it faster to search)", file=sys.stderr)
