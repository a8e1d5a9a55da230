"""Scenes searched by tile: GeoTIFF fixtures written here with rasterio (UTM and EPSG:4326, a rotated grid,
nodata borders, alpha, internal masks, 16-bit, overviews, internal tiling), checked against what is
computed independently: the pictures a mosaic was made of, footprints through the file's own affine
transform and GDAL's reprojection of the corners, numpy's counts of valid pixels, GDAL's GeoJSON reader."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import Affine, from_origin
from rasterio.warp import transform as reproject_points

import cli
import rsmclip
import rsmclip_cli
from bench.openclip_oracle import fill_with_noise
from data.demo import write_mosaic
from search import geo, index, scenes
from search.scenes import Tiling

ROOT = Path(__file__).resolve().parents[1]
TINY = rsmclip.PRESETS["tiny"]


@pytest.fixture
def weights(tmp_path, spm_model):
    folder = tmp_path / "weights"
    folder.mkdir()
    rsmclip.save(fill_with_noise(rsmclip.CLIP(TINY), seed=1), folder / "tiny.safetensors")
    shutil.copy(spm_model, folder / TINY.tokenizer)
    return folder / "tiny.safetensors"


def write_scene(path: Path, data: np.ndarray, crs="EPSG:32618", transform=None, **profile) -> Path:
    """A GeoTIFF of data [bands, rows, cols] (default: UTM 18N, 0.5 m pixels, north up)."""
    transform = transform or from_origin(583000.0, 4507000.0, 0.5, 0.5)
    bands, height, width = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands, dtype=data.dtype,
                       crs=crs, transform=transform, **profile) as dst:
        dst.write(data)
    return path


def search(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli.run_cli(rsmclip_cli.app, ["search", *map(str, args), "--precision", "fp32"])  # as embed_images
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (3, h, w), dtype=np.uint8)


def test_the_library_training_and_evaluation_never_load_rasterio():
    probe = ("import sys, rsmclip, train, eval\n"
             "print(sorted(m for m in ('rasterio', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


# ----------------------------------------------------------------------------- the tiles are the pictures

def test_the_tiles_of_a_mosaic_of_pictures_are_those_pictures(weights, tmp_path, capsys):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(6):
        Image.fromarray(rgb(64, 64, i).transpose(1, 2, 0)).save(pictures / f"{i}.png")
    paths = sorted(pictures.iterdir())
    scene = write_mosaic(paths, tmp_path / "scene.tif", columns=3)
    info = scenes.describe(scene, Tiling(64))
    windows = scenes.grid(info)
    assert windows == [(64 * (i % 3), 64 * (i // 3), 64, 64) for i in range(6)]  # row by row, no padding
    preprocess = rsmclip.Preprocess(64)
    tiles = scenes.Tiles([(scene, info, w) for w in windows], preprocess, 64, 0.5)
    for i, path in enumerate(paths):
        pixels, valid, keep, error = tiles[i]
        assert keep and valid == 1.0 and not error and torch.equal(pixels, preprocess(path))  # bit for bit
    model = rsmclip.load(weights)[0]
    with torch.no_grad():
        from_tiles = model.encode_image(torch.stack([tiles[i][0] for i in range(6)]), normalize=True)
    from_files = rsmclip.embed_images(model, preprocess, paths)[0]
    assert (from_tiles - from_files).abs().max() < 1e-5
    # and through the command: the scene's index rows are the folder's, in grid order
    for root, ix in ((pictures, "folder"), (scene, "scene")):
        code, out, err = search([root, "roads", "--model", weights, "--index", tmp_path / ix], capsys)
        assert code == 0, err
    tiling = Tiling(64)
    fingerprint = index.index_fingerprint(weights, "fp32")
    folder = index.read_index(tmp_path / "folder", fingerprint, 64, tiling)
    tiled = index.read_index(tmp_path / "scene", fingerprint, 64, tiling)
    assert tiled.manifest["sources"][""]["tiles"] == 6 and folder.rows == 6
    a, b = np.asarray(folder.feats[0], np.float32), np.asarray(tiled.feats[0], np.float32)
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(b - from_files.numpy()).max() < 2e-3  # float16 in the index: 3 significant digits


# ----------------------------------------------------------------------------- where each hit is

def corners(transform: Affine, window) -> list[tuple[float, float]]:
    """The window's corners through the file's own affine transform (rasterio's, not ours)."""
    col, row, w, h = window
    return [transform @ (c, r) for c, r in ((col, row), (col, row + h), (col + w, row + h), (col + w, row))]


def ring_area(ring) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:])) / 2


SCENES = {  # name: (CRS, geotransform): UTM north up, geographic at 60 N, a rotated and sheared grid
    "utm": ("EPSG:32618", from_origin(583000.0, 4507000.0, 0.5, 0.5)),
    "geographic": ("EPSG:4326", from_origin(10.0, 60.0, 1e-5, 1e-5)),
    "rotated": ("EPSG:32633", Affine.translation(500000.0, 6650000.0) @ Affine.rotation(30)
                @ Affine.shear(5, 0) @ Affine.scale(2.0, -2.0)),
}


@pytest.mark.parametrize("name", SCENES)
def test_each_hit_is_the_footprint_of_its_window_in_epsg_4326_and_in_the_scene_crs(
        name, weights, tmp_path, capsys):
    import pyogrio

    crs, transform = SCENES[name]
    scene = write_scene(tmp_path / f"{name}.tif", rgb(100, 150), crs, transform)
    hits_file = tmp_path / "hits.geojson"
    code, out, err = search([scene, "roads", "a river", "--model", weights, "--top-k", "4", "--overlap",
                             "0.5", "--nms", "1", "--geojson", hits_file], capsys)
    assert code == 0, err
    native = tmp_path / f"hits.{crs.replace(':', '_')}.geojson"
    assert f"wrote {hits_file}" in out and f"wrote {native}" in out
    doc = json.loads(hits_file.read_text())
    assert "crs" not in doc and len(doc["features"]) == 8
    native_doc = json.loads(native.read_text())
    assert native_doc["crs"]["properties"]["name"] == crs
    with rasterio.open(scene) as ds:
        file_transform = ds.transform
    typed = {"rank": int, "score": float, "query": str, "model": str, "scene": str, "col_off": int,
             "row_off": int, "width": int, "height": int, "crs": str, "minx": float, "miny": float,
             "maxx": float, "maxy": float, "gsd_m": float, "valid_frac": float}
    everywhere = []
    for feature, native_feature in zip(doc["features"], native_doc["features"]):
        p = feature["properties"]
        assert {k: type(v) for k, v in p.items()} == typed and p["crs"] == crs and p["scene"] == str(scene)
        window = (p["col_off"], p["row_off"], p["width"], p["height"])
        assert window[2:] == (64, 64) and window[0] % 32 == 0 and window[1] % 32 == 0  # stride 32
        want = corners(file_transform, window)
        xs, ys = zip(*want)
        assert np.allclose([p["minx"], p["miny"], p["maxx"], p["maxy"]], [min(xs), min(ys), max(xs), max(ys)])
        lon, lat = reproject_points(crs, "EPSG:4326", xs, ys)  # GDAL's reprojection of the corners
        for ring, expected in ((feature["geometry"]["coordinates"][0], list(zip(lon, lat))),
                               (native_feature["geometry"]["coordinates"][0], want)):
            assert ring[0] == ring[-1] and len(ring) == 4 * geo.DENSIFY + 1
            assert ring_area(ring) > 0  # counter-clockwise
            found = np.array(ring[:-1:geo.DENSIFY])
            assert len(found) == 4 and all(np.abs(found - c).sum(1).min() < 1e-6 for c in expected)
            assert all(len(str(v).split(".")[-1]) <= 7 for pt in ring for v in pt)
        # the densified points lie on the straight edges in the scene's CRS (to the 7 decimals of a degree
        # kept, about 1 cm: 0.02 pixels of 0.5 m)
        back = reproject_points("EPSG:4326", crs, *zip(*feature["geometry"]["coordinates"][0]))
        inverse = ~file_transform
        cols, rows = zip(*(inverse @ pt for pt in zip(*back)))
        col, row = window[:2]
        on_edge = [min(abs(c - col), abs(c - col - 64), abs(r - row), abs(r - row - 64))
                   for c, r in zip(cols, rows)]
        assert max(on_edge) < 0.05
        everywhere += list(zip(lon, lat))
    # GDAL's own reader (as QGIS opens it): the CRS, the fields, the bounds
    info = pyogrio.read_info(hits_file)
    assert info["crs"] == "EPSG:4326" and info["features"] == 8 and info["geometry_type"] == "Polygon"
    assert list(info["fields"]) == list(typed)
    lons, lats = zip(*everywhere)
    assert np.allclose(info["total_bounds"], (min(lons), min(lats), max(lons), max(lats)), atol=1e-6)
    assert pyogrio.read_info(native)["crs"] == crs


def test_gsd_in_metres_for_a_geographic_crs_and_resampling_to_a_gsd(tmp_path):
    """At 60 N a pixel of 1e-5 degrees is about 0.56 m east-west and 1.11 m north-south: measured here
    through UTM 32N (GDAL), not through the ellipsoid formula the code uses."""
    scene = write_scene(tmp_path / "g.tif", rgb(400, 400), *SCENES["geographic"])
    x, y = reproject_points("EPSG:4326", "EPSG:32632", [10.0, 10.00001, 10.0], [60.0, 60.0, 59.99999])
    east, north = math.dist((x[0], y[0]), (x[1], y[1])), math.dist((x[0], y[0]), (x[2], y[2]))
    assert 0.55 < east < 0.57 and 1.10 < north < 1.12
    info = scenes.describe(scene, Tiling(32, gsd=2.0))
    assert info["window"] == [round(32 * 2 / east), round(32 * 2 / north)]  # non-square in pixels
    assert abs(info["gsd_m"] - 2.0) < 0.05
    own = scenes.describe(scene, Tiling(32))
    assert own["window"] == [32, 32] and abs(own["gsd_m"] - (east + north) / 2) < 1e-3


def test_resampling_reads_through_gdal_by_window(tmp_path):
    """--gsd twice the scene's: a tile is the 2 x 2 average of its window (GDAL's average resampling),
    read by window, also through the overviews of a tiled file."""
    data = rgb(256, 256)
    tiled = {"tiled": True, "blockxsize": 64, "blockysize": 64}
    for name, profile in (("plain.tif", {}), ("tiled.tif", tiled)):
        scene = write_scene(tmp_path / name, data, **profile)
        if profile:
            with rasterio.open(scene, "r+") as ds:
                ds.build_overviews([2, 4], Resampling.average)
        info = scenes.describe(scene, Tiling(32, gsd=1.0))  # 0.5 m pixels: 64-pixel windows
        assert info["window"] == [64, 64] and info["tiled"] == bool(profile)
        with rasterio.open(scene) as ds:
            tile, valid = scenes.read_tile(ds, info, (64, 128, 64, 64), 32)
        block = data[:, 128:192, 64:128].reshape(3, 32, 2, 32, 2).mean((2, 4)).transpose(1, 2, 0)
        assert valid == 1.0 and np.abs(tile.astype(float) - block).max() <= 1


# ----------------------------------------------------------------------------- padding and valid pixels

def test_edge_tiles_are_padded_with_the_stride_unchanged(tmp_path):
    data = rgb(70, 100)
    info = scenes.describe(write_scene(tmp_path / "s.tif", data), Tiling(32))
    windows = scenes.grid(info)
    assert sorted({w[0] for w in windows}) == [0, 32, 64, 96]
    assert sorted({w[1] for w in windows}) == [0, 32, 64]
    assert len(windows) == 12 and all(w[2:] == (32, 32) for w in windows)
    with rasterio.open(tmp_path / "s.tif") as ds:
        tile, valid = scenes.read_tile(ds, info, (96, 64, 32, 32), 32)
    assert valid == (4 * 6) / (32 * 32)  # 4 columns and 6 rows of the scene, the rest past its edge
    assert np.array_equal(tile[:6, :4], data[:, 64:, 96:].transpose(1, 2, 0)) and not tile[6:].any()
    assert not tile[:, 4:].any()
    overlapped = scenes.grid(scenes.describe(tmp_path / "s.tif", Tiling(32, overlap=0.25)))
    assert sorted({w[0] for w in overlapped}) == [0, 24, 48, 72]  # stride 24; the last reaches past the edge


def masked_scenes(tmp: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """The same picture with its invalid pixels told three ways, and the mask of valid pixels: a nodata
    value, an alpha band, an internal (GDAL) mask. The left 20 columns and a blob are invalid."""
    data = rgb(64, 96)
    valid = np.ones((64, 96), bool)
    valid[:, :20] = False
    valid[40:60, 50:90] = False
    data[:, ~valid] = 0
    found = {"nodata": (write_scene(tmp / "nodata.tif", data, nodata=0), valid)}
    alpha = np.concatenate([data, (valid * 255).astype(np.uint8)[None]])
    path = write_scene(tmp / "alpha.tif", alpha, photometric="RGB", alpha="YES")
    with rasterio.open(path, "r+") as ds:
        ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    found["alpha"] = (path, valid)
    path = write_scene(tmp / "mask.tif", data)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        ds.write_mask((valid * 255).astype(np.uint8))
    found["mask"] = (path, valid)
    return found


@pytest.mark.parametrize("how", ["nodata", "alpha", "mask"])
def test_the_valid_fraction_comes_from_the_mask_and_tiles_below_min_valid_are_left_out(how, weights, tmp_path,
                                                                                       capsys):
    path, valid = masked_scenes(tmp_path)[how]
    info = scenes.describe(path, Tiling(32))
    assert info["bands"] == [1, 2, 3] and info["alpha"] == (how == "alpha")
    expected = []
    with rasterio.open(path) as ds:
        for window in scenes.grid(info):
            col, row, w, h = window
            padded = np.zeros((h, w), bool)
            part = valid[row:row + h, col:col + w]
            padded[:part.shape[0], :part.shape[1]] = part
            tile, share = scenes.read_tile(ds, info, window, 32)
            assert share == padded.mean() and not tile[~padded].any()
            expected.append(share)
    min_valid = 0.6
    kept = [s for s in expected if s >= min_valid and s > 0]
    code, out, err = search([path, "roads", "--model", weights, "--tile", 32, "--min-valid", min_valid,
                             "--top-k", "50", "--out", tmp_path / "hits.json", "--index", tmp_path / "ix"],
                            capsys)
    assert code == 0, err
    below = len(expected) - len(kept)
    assert f"{len(kept)} of {len(expected)} tiles indexed ({below} below --min-valid 0.6)" in out
    hits = json.loads((tmp_path / "hits.json").read_text())["roads"]
    assert len(hits) == len(kept) and all(h["valid_frac"] >= min_valid for h in hits)
    assert sorted(h["valid_frac"] for h in hits) == pytest.approx(sorted(kept))


def test_a_16_bit_scene_is_stretched_once_for_the_whole_scene(tmp_path):
    """A dark left half and a bright right half: with one stretch per scene the dark tile stays dark (a
    stretch per tile would make both full-range)."""
    data = np.zeros((3, 64, 128), np.uint16)
    rng = np.random.default_rng(0)
    data[:, :, :64] = rng.integers(100, 200, (3, 64, 64))
    data[:, :, 64:] = rng.integers(3000, 4000, (3, 64, 64))
    path = write_scene(tmp_path / "s16.tif", data)
    info = scenes.describe(path, Tiling(64))
    lo, hi = np.percentile(data[0].astype(float), (1, 99))
    assert info["stretch"][0] == pytest.approx([lo, hi])
    with rasterio.open(path) as ds:
        dark, _ = scenes.read_tile(ds, info, (0, 0, 64, 64), 64)
        bright, _ = scenes.read_tile(ds, info, (64, 0, 64, 64), 64)
    expected = np.clip((data[0, :, :64] - lo) * 255 / (hi - lo), 0, 255)
    assert np.abs(dark[..., 0] - expected).max() <= 0.5 + 1e-9
    assert dark.mean() < 5 and bright.mean() > 200


# ----------------------------------------------------------------------------- the index over time

def test_a_folder_of_scenes_is_indexed_once_then_updated_scene_by_scene(weights, tmp_path, capsys):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(3):
        write_scene(folder / f"s{i}.tif", rgb(64, 96, i))
    Image.fromarray(rgb(40, 40, 9).transpose(1, 2, 0)).save(folder / "photo.png")
    args = [folder, "roads", "--model", weights, "--index", tmp_path / "ix", "--tile", "32", "--top-k", "100",
            "--out", tmp_path / "hits.json"]
    code, out, err = search(args, capsys)
    assert code == 0, err
    assert "1 images and 3 scenes (18 tiles) (4 added, 0 removed or changed" in out
    first = {h["path"]: h["score"] for h in json.loads((tmp_path / "hits.json").read_text())["roads"]}
    code, out, err = search(args, capsys)
    assert "(0 added, 0 removed or changed" in out
    write_scene(folder / "s3.tif", rgb(64, 32, 3))  # a new scene: 2 tiles
    (folder / "s0.tif").unlink()
    write_scene(folder / "s1.tif", rgb(32, 32, 11))  # changed: 1 tile
    code, out, err = search(args, capsys)
    assert code == 0, err
    assert "1 images and 3 scenes (9 tiles) (2 added, 2 removed or changed" in out
    ix = index.read_index(tmp_path / "ix", index.index_fingerprint(weights, "fp32"), 64, Tiling(32))
    assert ix.rows == 10 and sorted(ix.manifest["sources"]) == ["photo.png", "s1.tif", "s2.tif", "s3.tif"]
    assert len(list((tmp_path / "ix").iterdir())) == 1 + 2 * len(ix.manifest["parts"])  # no stale file
    hits = json.loads((tmp_path / "hits.json").read_text())["roads"]
    unchanged = [h for h in hits if "s2.tif" in h["path"] or "photo" in h["path"]]
    photo = [h for h in unchanged if "photo" in h["path"]]
    assert len(unchanged) == 7 and all(first[h["path"]] == h["score"] for h in photo)
    # the same index built from scratch has the same rows
    shutil.rmtree(tmp_path / "ix")
    search(args, capsys)
    fresh = index.read_index(tmp_path / "ix", index.index_fingerprint(weights, "fp32"), 64, Tiling(32))
    key = lambda ix, r: (ix.locate(r)[0], tuple(ix.locate(r)[2])[1:3])  # noqa: E731
    rows_a = {key(ix, r): np.asarray(np.concatenate(ix.feats)[r]) for r in range(ix.rows)}
    rows_b = {key(fresh, r): np.asarray(np.concatenate(fresh.feats)[r]) for r in range(fresh.rows)}
    assert rows_a.keys() == rows_b.keys() and all(np.array_equal(rows_a[k], rows_b[k]) for k in rows_a)


def test_a_killed_update_resumes_after_its_last_commit(weights, tmp_path, capsys, monkeypatch):
    """Tiles are committed every FLUSH tiles: an update stopped in its third chunk keeps the first two, and
    the next search embeds only the rest; the index then equals one built in one go."""
    scene = write_scene(tmp_path / "s.tif", rgb(96, 128))  # 12 tiles of 32
    args = [scene, "roads", "--model", weights, "--tile", "32", "--workers", "0"]
    monkeypatch.setattr(index, "FLUSH", 4)
    real, calls = index.embed_part, []

    def killed(*a, **k):
        calls.append(len(a[5]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as SIGINT would, in the middle of the update
        return real(*a, **k)

    monkeypatch.setattr(index, "embed_part", killed)
    with pytest.raises(SystemExit) as stopped:  # click turns the interrupt into exit 130
        cli.run_cli(rsmclip_cli.app, ["search", *map(str, args), "--index", str(tmp_path / "ix"),
                                      "--precision", "fp32"])
    assert stopped.value.code == 130 and calls == [4, 4, 4]
    monkeypatch.setattr(index, "embed_part", real)
    code, out, err = search(args + ["--index", tmp_path / "ix"], capsys)
    assert code == 0 and "s.tif: resuming at tile 8 of 12" in err and "12 of 12 tiles indexed" in out, err
    code, out, err = search(args + ["--index", tmp_path / "fresh"], capsys)
    fingerprint, tiling = index.index_fingerprint(weights, "fp32"), Tiling(32)
    resumed = index.read_index(tmp_path / "ix", fingerprint, 64, tiling)
    fresh = index.read_index(tmp_path / "fresh", fingerprint, 64, tiling)
    assert resumed.manifest["sources"][""] == fresh.manifest["sources"][""]
    assert np.array_equal(np.concatenate(resumed.tables), np.concatenate(fresh.tables))
    assert np.array_equal(np.concatenate(resumed.feats), np.concatenate(fresh.feats))


def test_exact_search_in_chunks_and_faiss_agree_with_a_plain_matrix_product(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3000, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    folder = tmp_path / "ix"
    folder.mkdir()
    parts = []
    for n, block in enumerate(np.split(rows.astype(np.float16), [1000])):
        (folder / f"p{n}.f16").write_bytes(block.tobytes())
        parts.append({"name": f"p{n}", "rows": len(block), "sources": ["x"]})
        index.save_table(folder / f"p{n}.npy", np.zeros(len(block), index.TABLE))
    manifest = {"format": index.FORMAT, "model": "m", "dim": 32, "tiling": Tiling(64).as_json(), "root": "/",
                "sources": {"x": {"kind": "picture"}}, "parts": parts}
    (folder / "index.json").write_text(json.dumps(manifest))
    ix = index.read_index(folder, "m", 32, Tiling(64))
    queries = torch.from_numpy(rows[[5, 1500, 2999]] + 0.01)
    full = torch.from_numpy(rows.astype(np.float16).astype(np.float32)) @ queries.T
    want = full.T.topk(10, dim=1)
    monkeypatch.setattr(index, "CHUNK", 256)  # many chunks, across the two parts
    scores, found = index.exact_top(ix, queries, 10)
    assert torch.equal(found, want.indices) and torch.allclose(scores, want.values)
    scores, found = index.ann_top(ix, queries, 10, nprobe=10 ** 6)  # every list probed: exact but for fp16
    assert (found == want.indices).float().mean() >= 0.9
    assert (folder / "ann.faiss").exists()


# ----------------------------------------------------------------------------- past one machine

def test_two_processes_under_torchrun_give_the_index_of_one(weights, tmp_path, capsys):
    scene = write_scene(tmp_path / "s.tif", rgb(128, 192))
    code, out, err = search([scene, "roads", "--model", weights, "--index", tmp_path / "one", "--workers",
                             "0"], capsys)
    assert code == 0, err
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free), str(ROOT / "rsmclip_cli.py"), "search", str(scene),
                             "roads", "--model", str(weights), "--index", str(tmp_path / "two"), "--workers",
                             "0", "--device", "cpu", "--precision", "fp32"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("index ") == 1  # rank 0 speaks
    fingerprint, tiling = index.index_fingerprint(weights, "fp32"), Tiling(64)
    one = index.read_index(tmp_path / "one", fingerprint, 64, tiling)
    two = index.read_index(tmp_path / "two", fingerprint, 64, tiling)
    assert len(two.manifest["parts"]) == 2 and [p["rows"] for p in two.manifest["parts"]] == [3, 3]
    assert np.array_equal(np.concatenate(one.tables), np.concatenate(two.tables))
    assert np.abs(np.concatenate(one.feats).astype(np.float32)
                  - np.concatenate(two.feats).astype(np.float32)).max() < 2e-3


# ----------------------------------------------------------------------------- the page

def test_the_page_draws_the_hits_on_each_scene(weights, tmp_path, capsys):
    scene = write_mosaic([write_picture(tmp_path, i) for i in range(8)], tmp_path / "scene.tif", columns=4)
    page = tmp_path / "hits.html"
    code, out, err = search([scene, "roads", "港口里的船", "--model", weights, "--top-k", "3", "--html",
                             page], capsys)
    assert code == 0, err
    text = page.read_text(encoding="utf-8")
    assert text.count("<rect ") == 6 and text.count("<svg ") == 2 and "<script" not in text
    assert text.count('src="data:image/jpeg;base64,') == 2 + 6  # a preview per query, a crop per hit
    assert "#1 " in text and "港口里的船" in text and "EPSG:32629" in text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no headless Chromium here (Debian: apt install chromium) for the screenshot check")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,700", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    yellow = (pixels[..., 0] > 220) & (pixels[..., 1] > 220) & (pixels[..., 2] < 40)
    assert yellow.sum() > 200  # the hit rectangles and their labels were drawn over the preview


def write_picture(tmp: Path, i: int) -> Path:
    path = tmp / f"pic{i}.png"
    Image.fromarray(rgb(64, 64, 100 + i).transpose(1, 2, 0)).save(path)
    return path
