"""Manifests: validation, downloads against a loopback HTTP server, safe unpacking, dataset_sources."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from affine import Affine
from shapely.geometry import box

from magseg_nb import geo
from magseg_nb import manifest as mf
from magseg_nb.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "data_manifests").glob("*.yaml"))
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB of binary data
HTML = b"<!DOCTYPE html>\n<html><body>Please log in</body></html>\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- loopback server


class FakeServer:
    """Serves `files` on 127.0.0.1; `modes[path]` picks a misbehaviour; `requests` logs (path, Range)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                mode = server.modes.get(self.path, "ok")
                if mode.isdigit():
                    self.send_error(int(mode))
                    return
                if mode == "html":
                    self._send(200, HTML, {"Content-Type": "text/html; charset=utf-8"})
                    return
                if mode == "html-as-binary":
                    self._send(200, HTML, {"Content-Type": "application/octet-stream"})
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, rng = 0, self.headers.get("Range")
                if rng and mode != "no-range":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                    status = 206
                else:
                    headers, status = {}, 200
                body = data[start:]
                if mode.startswith("drop-after-"):
                    # Promise the whole body, send part of it, hang up (once).
                    cut = int(mode.removeprefix("drop-after-"))
                    server.modes[self.path] = "ok"
                    self.send_response(status)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(status, body, {"Content-Type": "application/octet-stream", **headers})

            def _send(self, status, body, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def entry(urls, data=PAYLOAD, **kw):
    e = {"name": "data.bin", "urls": urls, "sha256": sha(data), "size_bytes": len(data)}
    e.update(kw)
    return e


# --------------------------------------------------------------------------- fetch


def test_fetch_verifies_and_renames(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    path = mf.fetch(entry([server.url("/data.bin")]), tmp_path, log=lambda m: None)
    assert path == tmp_path / "data.bin"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    # A second fetch finds the verified file and does not download again.
    n = len(server.requests)
    assert mf.fetch(entry([server.url("/data.bin")]), tmp_path, log=lambda m: None) == path
    assert len(server.requests) == n


def test_fetch_resumes_after_dropped_connection(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.modes["/data.bin"] = "drop-after-300000"
    e = entry([server.url("/data.bin")])
    with pytest.raises(mf.FetchError, match="resume"):
        mf.fetch(e, tmp_path, log=lambda m: None)
    part = tmp_path / "data.bin.part"
    have = part.stat().st_size
    assert 0 < have <= 300000  # what arrived is kept (up to the last whole network read)
    assert not (tmp_path / "data.bin").exists()  # never a half-written final file
    path = mf.fetch(e, tmp_path, log=lambda m: None)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/data.bin", f"bytes={have}-")
    assert not part.exists()


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.modes["/data.bin"] = "no-range"
    (tmp_path / "data.bin.part").write_bytes(b"\x00" * 1000)  # stale partial file
    logs = []
    path = mf.fetch(entry([server.url("/data.bin")]), tmp_path, log=logs.append)
    assert path.read_bytes() == PAYLOAD
    assert any("ignored the Range" in m for m in logs)


def test_fetch_complete_part_file_is_verified_not_redownloaded(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    path = mf.fetch(entry([server.url("/data.bin")]), tmp_path, log=lambda m: None)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]


def test_checksum_mismatch_fails_and_leaves_nothing(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD[::-1]  # same size, other bytes: "changed upstream"
    with pytest.raises(mf.FetchError) as err:
        mf.fetch(entry([server.url("/data.bin")]), tmp_path, log=lambda m: None)
    msg = str(err.value)
    assert "sha256 mismatch" in msg and sha(PAYLOAD) in msg and sha(PAYLOAD[::-1]) in msg
    assert "changed upstream" in msg
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_size_reported_by_server_is_checked_before_download(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD + b"extra"
    with pytest.raises(
        mf.FetchError, match=rf"server reports {len(PAYLOAD) + 5} bytes but the manifest says {len(PAYLOAD)}"
    ):
        mf.fetch(entry([server.url("/data.bin")]), tmp_path, log=lambda m: None)


@pytest.mark.parametrize("mode", ["html", "html-as-binary"])
def test_html_page_instead_of_data_is_refused(server, tmp_path, mode):
    server.modes["/data.bin"] = mode
    with pytest.raises(mf.FetchError, match="HTML page") as err:
        mf.fetch(entry([server.url("/data.bin")]), tmp_path, log=lambda m: None)
    assert "browser" in str(err.value)
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_mirrors_tried_in_order(server, tmp_path):
    server.modes["/primary.bin"] = "html"
    server.modes["/second.bin"] = "403"
    server.files["/mirror.bin"] = PAYLOAD
    urls = [server.url(p) for p in ("/primary.bin", "/second.bin", "/missing.bin", "/mirror.bin")]
    path = mf.fetch(entry(urls), tmp_path, log=lambda m: None)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/primary.bin", "/second.bin", "/missing.bin", "/mirror.bin"]


def test_all_mirrors_failing_explains_each(server, tmp_path):
    server.modes["/a.bin"] = "403"
    server.modes["/c.bin"] = "503"
    urls = [server.url("/a.bin"), server.url("/b.bin"), server.url("/c.bin")]
    with pytest.raises(mf.FetchError) as err:
        mf.fetch(entry(urls), tmp_path, log=lambda m: None)
    msg = str(err.value)
    assert "gated" in msg and "404" in msg and "503" in msg
    assert all(u in msg for u in urls)


def test_unknown_checksum_is_refused_before_downloading(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    with pytest.raises(mf.ChecksumError, match="record_checksum=True"):
        mf.fetch(entry([server.url("/data.bin")], sha256="unknown"), tmp_path, log=lambda m: None)
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


def test_unknown_checksum_recorded(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    logs = []
    e = entry([server.url("/data.bin")], sha256="unknown", size_bytes="unknown")
    path = mf.fetch(e, tmp_path, record_checksum=True, log=logs.append)
    assert path.read_bytes() == PAYLOAD
    assert any(sha(PAYLOAD) in m and "manifest" in m for m in logs)
    assert (tmp_path / "data.bin.sha256").read_text() == f"{sha(PAYLOAD)}  data.bin\n"


def test_unknown_checksum_allowed_warns(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    logs = []
    mf.fetch(
        entry([server.url("/data.bin")], sha256="unknown"),
        tmp_path,
        allow_unknown_checksum=True,
        log=logs.append,
    )
    assert any("NOT verified" in m for m in logs)


def test_md5_only_entry_is_verified(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    good = hashlib.md5(PAYLOAD).hexdigest()
    logs = []
    e = entry([server.url("/data.bin")], sha256="unknown", md5=good)
    assert mf.fetch(e, tmp_path, log=logs.append).read_bytes() == PAYLOAD
    assert logs == []  # verified by md5: nothing to warn about
    mf.fetch(e, tmp_path, record_checksum=True, log=logs.append)  # already there: just record the sha256
    assert (tmp_path / "data.bin.sha256").read_text().startswith(sha(PAYLOAD))
    with pytest.raises(mf.FetchError, match="md5 mismatch"):
        mf.fetch(entry([server.url("/data.bin")], name="other.bin", sha256="unknown", md5="0" * 32), tmp_path)


def test_local_paths_and_file_urls(tmp_path):
    src = tmp_path / "already here.bin"
    src.write_bytes(PAYLOAD)
    a = mf.fetch(entry([str(src)]), tmp_path / "a", log=lambda m: None)
    b = mf.fetch(entry([src.as_uri()]), tmp_path / "b", log=lambda m: None)
    assert a.read_bytes() == b.read_bytes() == PAYLOAD
    with pytest.raises(mf.FetchError, match="does not exist"):
        mf.fetch(entry([str(tmp_path / "nope.bin")]), tmp_path / "c", log=lambda m: None)


def test_existing_wrong_file_is_not_trusted(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"something else")
    with pytest.raises(mf.ChecksumError, match="already exists.*delete it"):
        mf.fetch(entry(["http://127.0.0.1:9/never"]), tmp_path, log=lambda m: None)


def test_sam_manifest_entries_work_with_fetch(server, tmp_path):
    models = mf.load_manifest(ROOT / "data_manifests" / "sam_checkpoints.yaml")["models"]
    assert set(models) >= {"vit_b", "vit_h"}
    fake = b"not really a checkpoint"
    server.files["/sam.pth"] = fake
    e = dict(models["vit_b"], urls=[server.url("/sam.pth")], sha256=sha(fake), size_bytes=len(fake))
    path = mf.fetch(e, tmp_path, log=lambda m: None)
    assert path.name == "sam_vit_b_01ec64.pth" and path.read_bytes() == fake


# --------------------------------------------------------------------------- unpack


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, symlink
            tf.addfile(info)
    return path


def test_unpack_zip_and_tar(tmp_path):
    members = {"top/a.txt": b"a", "top/sub/b.txt": b"b"}
    for arc in (_zip(tmp_path / "x.zip", members), _tar(tmp_path / "x.tar.gz", members)):
        out = mf.unpack(arc, tmp_path / f"out_{arc.name}")
        assert (out / "top" / "sub" / "b.txt").read_bytes() == b"b"
        assert not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("bad", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_unpack_refuses_path_traversal(tmp_path, bad):
    for arc in (
        _zip(tmp_path / "bad.zip", {"fine.txt": b"x", bad: b"evil"}),
        _tar(tmp_path / "bad.tar", {bad: b"evil"}),
    ):
        target = tmp_path / "deep" / "out"
        with pytest.raises(mf.UnpackError, match="outside the target folder"):
            mf.unpack(arc, target)
        assert not target.exists() and not (tmp_path / "deep" / "out.partial").exists()
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()


def test_unpack_refuses_links_and_corrupt_archives(tmp_path):
    with pytest.raises(mf.UnpackError, match="links"):
        mf.unpack(_tar(tmp_path / "l.tar", {"a": b"a"}, symlink="/etc/passwd"), tmp_path / "o1")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(HTML)
    with pytest.raises(mf.UnpackError, match="fetch again"):
        mf.unpack(broken, tmp_path / "o2")


# --------------------------------------------------------------------------- manifest validation


def test_every_shipped_manifest_validates():
    assert {p.name for p in MANIFESTS} >= {
        "ai4smallfarms.yaml",
        "fields_of_the_world.yaml",
        "sam_checkpoints.yaml",
    }
    for path in MANIFESTS:
        data = mf.load_manifest(path)
        for ds in data.get("datasets", {}).values():
            for f in ds["files"]:
                assert f["urls"][0].startswith("https://")
    ftw = mf.manifest_entry(
        ROOT / "data_manifests" / "fields_of_the_world.yaml", "datasets", "fields_of_the_world"
    )
    assert {f["country"] for f in ftw["files"]} == {"india", "cambodia", "vietnam"}
    ai4 = mf.manifest_entry(ROOT / "data_manifests" / "ai4smallfarms.yaml", "datasets", "ai4smallfarms")
    assert ai4["license"] == "CC-BY-4.0" and ai4["labels"]["format"] == "gpkg"


def _good_dataset() -> dict:
    path = ROOT / "data_manifests" / "ai4smallfarms.yaml"
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    "mutate, key",
    [
        (
            lambda d: d["datasets"]["ai4smallfarms"].pop("license"),
            "datasets.ai4smallfarms: missing key 'license'",
        ),
        (
            lambda d: d["datasets"]["ai4smallfarms"]["files"][0].update(sha256="abc"),
            "datasets.ai4smallfarms.files[0].sha256",
        ),
        (lambda d: d["datasets"]["ai4smallfarms"]["files"][0].update(size_bytes=-3), "files[0].size_bytes"),
        (lambda d: d["datasets"]["ai4smallfarms"]["files"][1].update(urls=[]), "files[1].urls"),
        (lambda d: d["datasets"]["ai4smallfarms"]["files"][0].update(name="../x.zip"), "files[0].name"),
        (lambda d: d["datasets"]["ai4smallfarms"]["files"][0].update(unpack="rar"), "files[0].unpack"),
        (
            lambda d: d["datasets"]["ai4smallfarms"]["labels"]["class_map"].update(vietnam="rice"),
            "class_map['vietnam']",
        ),
        (lambda d: d["datasets"]["ai4smallfarms"]["layout"].update(kind="other"), "layout.kind"),
        (lambda d: d.pop("datasets"), "top level"),
        (
            lambda d: d["datasets"]["ai4smallfarms"]["files"][0].update(unpack_to="../up"),
            "files[0].unpack_to",
        ),
        (
            lambda d: d["datasets"]["ai4smallfarms"]["layout"].update(image_regex="(unclosed"),
            "layout.image_regex",
        ),
        (
            lambda d: d["datasets"]["ai4smallfarms"]["layout"].update(image_regex=r"(?P<tile>\d+)"),
            "named groups",
        ),
        (lambda d: d["datasets"]["ai4smallfarms"]["layout"].pop("labels"), "layout: missing key 'labels'"),
    ],
)
def test_manifest_errors_name_file_and_key(tmp_path, mutate, key):
    data = _good_dataset()
    mutate(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(mf.ManifestError) as err:
        mf.load_manifest(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_manifest_unreadable_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("datasets: [unclosed\n")
    with pytest.raises(mf.ManifestError, match="not valid YAML"):
        mf.load_manifest(path)
    with pytest.raises(mf.ManifestError, match="not found"):
        mf.load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(mf.ManifestError, match="it has"):
        mf.manifest_entry(ROOT / "data_manifests" / "ai4smallfarms.yaml", "datasets", "nope")


# --------------------------------------------------------------------------- dataset_sources

CRS = "EPSG:32648"


def _write_tif(path: Path, data: np.ndarray, x0=500000.0, y0=1200000.0, res=10.0, crs=CRS):
    geo.write_geotiff(path, data, crs, Affine(res, 0, x0, 0, -res, y0))


def _local_manifest(tmp_path: Path, name: str, dataset: str, archives: dict[str, Path]) -> Path:
    """A copy of a shipped manifest whose files point at local archives (with their real sha256)."""
    data = yaml.safe_load((ROOT / "data_manifests" / name).read_text())
    spec = data["datasets"][dataset]
    files = []
    for f in spec["files"]:
        if f["name"] in archives:
            arc = archives[f["name"]]
            files.append(dict(f, urls=[arc.as_uri()], sha256=sha256_file(arc), size_bytes=arc.stat().st_size))
    spec["files"] = files
    out = tmp_path / name
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.fixture
def ai4sf_archive(tmp_path) -> Path:
    """A miniature AI4SmallFarms bundle: sentinel-2-asia/{split}/images + reference/*_areas.gpkg, zipped."""
    src = tmp_path / "src"
    base = src / "sentinel-2-asia"
    rng = np.random.default_rng(0)
    tiles = [(0, "vietnam", "train"), (22, "vietnam", "validate"), (2, "cambodia", "test")]
    for tile, country, split in tiles:
        x0 = 500000.0 + 1000 * tile
        _write_tif(
            base / split / "images" / f"{tile}_{country}.tif",
            rng.integers(0, 3000, (10, 40, 40), dtype=np.uint16),
            x0=x0,
        )
        polys = [box(x0 + 20, 1199620, x0 + 180, 1199780), box(x0 + 200, 1199620, x0 + 380, 1199980)]
        gdf = gpd.GeoDataFrame(
            {"id": [tile] * 2, "country": [country] * 2, "_predicate": ["INTERSECTS"] * 2},
            geometry=polys,
            crs=CRS,
        )
        (base / "reference").mkdir(parents=True, exist_ok=True)
        gdf.to_file(base / "reference" / f"{tile}_{country}_areas.gpkg", driver="GPKG")
    # also masks and the tiles table, which dataset_sources must ignore
    _write_tif(base / "train" / "masks" / "0_vietnam.tif", np.zeros((40, 40), np.uint8))
    gpd.GeoDataFrame(
        {"id": [t for t, _, _ in tiles], "split": [s for _, _, s in tiles]},
        geometry=[box(0, 0, 1, 1)] * 3,
        crs=CRS,
    ).to_file(base / "tiles_asia.gpkg", driver="GPKG")
    arc = tmp_path / "ai4smallfarms_dataverse_bundle.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("MANIFEST.TXT", "files of doi:10.17026/dans-xy6-ngg6\n")
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src).as_posix())
    return arc


def test_dataset_sources_ai4smallfarms(tmp_path, ai4sf_archive):
    man = _local_manifest(
        tmp_path, "ai4smallfarms.yaml", "ai4smallfarms", {ai4sf_archive.name: ai4sf_archive}
    )
    data_root = tmp_path / "data"
    ds_dir = mf.prepare_dataset(man, "ai4smallfarms", data_root, log=lambda m: None)
    assert (ds_dir / "downloads" / ai4sf_archive.name).is_file()
    sources = mf.dataset_sources(man, "ai4smallfarms", data_root)
    by_id = {s.scene_id: s for s in sources}
    assert sorted(by_id) == ["cambodia_2", "vietnam_0", "vietnam_22"]
    assert {s.scene_id: s.split for s in sources} == {
        "vietnam_0": "train",
        "vietnam_22": "val",
        "cambodia_2": "test",
    }
    s = by_id["cambodia_2"]
    assert s.country == "cambodia"
    assert s.labels_path == ds_dir / "bundle" / "sentinel-2-asia" / "reference" / "2_cambodia_areas.gpkg"
    assert s.class_field == "country" and s.class_map == {"vietnam": "field", "cambodia": "field"}
    assert s.layer is None and s.presence_only is False
    labels = gpd.read_file(s.labels_path, layer=s.layer)
    assert set(labels[s.class_field].map(s.class_map)) == {"field"}
    # the 10-band uint16 tile became an RGB uint8 copy on the same grid
    raw = ds_dir / "bundle" / "sentinel-2-asia" / "test" / "images" / "2_cambodia.tif"
    with rasterio.open(s.image_path) as rgb, rasterio.open(raw) as src:
        assert (rgb.count, rgb.dtypes[0]) == (3, "uint8")
        assert rgb.crs == src.crs and rgb.transform == src.transform
        assert rgb.read().std() > 10  # stretched, not blank
    assert s.image_path.parent.parent == ds_dir / "derived"
    # the cached copy is reused on a second call
    mtime = s.image_path.stat().st_mtime_ns
    again = {x.scene_id: x for x in mf.dataset_sources(man, "ai4smallfarms", data_root)}
    assert again["cambodia_2"].image_path.stat().st_mtime_ns == mtime


def test_dataset_sources_points_at_data_already_on_disk(tmp_path, ai4sf_archive):
    on_disk = mf.unpack(ai4sf_archive, tmp_path / "my_copy")
    man = ROOT / "data_manifests" / "ai4smallfarms.yaml"
    sources = mf.dataset_sources(man, "ai4smallfarms", on_disk)
    assert len(sources) == 3
    assert all(s.labels_path.is_relative_to(on_disk) for s in sources)


def test_dataset_sources_missing_data_says_what_to_do(tmp_path):
    man = ROOT / "data_manifests" / "ai4smallfarms.yaml"
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        mf.dataset_sources(man, "ai4smallfarms", tmp_path / "nothing")
    (tmp_path / "empty" / "ai4smallfarms").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="found no scenes"):
        mf.dataset_sources(man, "ai4smallfarms", tmp_path / "empty")


def test_dataset_sources_refuses_two_copies(tmp_path, ai4sf_archive):
    mf.unpack(ai4sf_archive, tmp_path / "two" / "copy1")
    mf.unpack(ai4sf_archive, tmp_path / "two" / "copy2")
    with pytest.raises(ValueError, match="found twice"):
        mf.dataset_sources(ROOT / "data_manifests" / "ai4smallfarms.yaml", "ai4smallfarms", tmp_path / "two")


@pytest.fixture
def ftw_archive(tmp_path) -> Path:
    """A miniature FTW country zip (India): chips parquet, s2_images windows, label masks."""
    src = tmp_path / "ftw_src"
    rng = np.random.default_rng(1)
    aois = ["g1_00001", "g1_00002", "g1_00003"]
    src.mkdir()
    pd.DataFrame({"aoi_id": aois, "split": ["train", "none", "test"], "extra": [1, 2, 3]}).to_parquet(
        src / "chips_india.parquet"
    )
    for i, aoi in enumerate(aois[:2]):  # the third AOI has no imagery, like some real ones
        for win in ("window_a", "window_b"):
            _write_tif(
                src / "s2_images" / win / f"{aoi}.tif",
                rng.integers(0, 4000, (4, 32, 32), dtype=np.uint16),
                x0=300000.0 + 1000 * i,
            )
        inst = np.zeros((32, 32), np.int32)
        if i == 0:  # the second chip has no fields at all
            inst[2:10, 2:20] = 7
            inst[12:30, 5:15] = 9
        _write_tif(src / "label_masks" / "instance" / f"{aoi}.tif", inst, x0=300000.0 + 1000 * i)
        _write_tif(
            src / "label_masks" / "semantic_3class" / f"{aoi}.tif",
            (inst > 0).astype(np.uint8),
            x0=300000.0 + 1000 * i,
        )
    arc = tmp_path / "india.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src).as_posix())
    return arc


def test_dataset_sources_fields_of_the_world(tmp_path, ftw_archive):
    man = _local_manifest(
        tmp_path, "fields_of_the_world.yaml", "fields_of_the_world", {"india.zip": ftw_archive}
    )
    data_root = tmp_path / "data"
    mf.prepare_dataset(man, "fields_of_the_world", data_root, files=["india.zip"], log=lambda m: None)
    logs = []
    sources = mf.dataset_sources(man, "fields_of_the_world", data_root, log=logs.append)
    # g1_00002 has no field (skipped: prepare_scene needs polygons), g1_00003 has no imagery
    assert [s.scene_id for s in sources] == ["india_g1_00001"]
    assert sources[0].split == "train"
    assert logs == ["skipped 1 FTW chip(s) without any field polygon"]
    s = sources[0]
    assert s.country == "india" and s.presence_only is True
    assert s.layer == "labels" and s.class_field == "class" and s.class_map == {"field": "field"}
    labels = gpd.read_file(s.labels_path, layer="labels")
    assert sorted(labels["field_id"]) == [7, 9] and set(labels["class"]) == {"field"}
    assert labels.crs == CRS and labels.geometry.is_valid.all()
    assert sorted(labels.area.round()) == [8 * 18 * 100.0, 18 * 10 * 100.0]
    with rasterio.open(s.image_path) as rgb:
        assert (rgb.count, rgb.dtypes[0], rgb.crs.to_string()) == (3, "uint8", CRS)
    empty = gpd.read_file(
        data_root / "fields_of_the_world" / "derived" / "india" / "g1_00002" / "labels.gpkg"
    )
    assert len(empty) == 0 and empty.crs == CRS


def test_prepare_dataset_rejects_unknown_file_names(tmp_path):
    with pytest.raises(mf.ManifestError, match="has no"):
        mf.prepare_dataset(
            ROOT / "data_manifests" / "fields_of_the_world.yaml",
            "fields_of_the_world",
            tmp_path,
            files=["mars.zip"],
        )


def test_scene_sources_feed_geo_prepare_scene(tmp_path, ai4sf_archive, ftw_archive):
    """The contract with notebook 01: every SceneSource goes through geo.prepare_scene unchanged."""
    from magseg_nb import geo
    from magseg_nb.labels import CLASS_IDS

    data_root = tmp_path / "data"
    man_a = _local_manifest(
        tmp_path, "ai4smallfarms.yaml", "ai4smallfarms", {ai4sf_archive.name: ai4sf_archive}
    )
    man_f = _local_manifest(
        tmp_path, "fields_of_the_world.yaml", "fields_of_the_world", {"india.zip": ftw_archive}
    )
    sources = []
    for man, name in ((man_a, "ai4smallfarms"), (man_f, "fields_of_the_world")):
        mf.prepare_dataset(man, name, data_root, log=lambda m: None)
        sources += mf.dataset_sources(man, name, data_root, log=lambda m: None)
    assert len(sources) == 4
    for s in sources:
        out = geo.prepare_scene(
            s.image_path, s.labels_path, tmp_path / "scenes" / s.scene_id,
            class_field=s.class_field, class_map=s.class_map, layer=s.layer,
        )  # fmt: skip
        with rasterio.open(out["semantic"]) as sem:
            values = np.unique(sem.read(1))
            assert sem.crs == CRS
        assert CLASS_IDS["field"] in values, s.scene_id
        with rasterio.open(out["instances"]) as inst:
            assert inst.read(1).max() >= 2  # both fixture fields became instances


def test_command_line(server, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert mf.main(["check"]) == 0
    assert "ok  data_manifests/sam_checkpoints.yaml" in capsys.readouterr().out
    # a model fetch whose download fails prints the reason and returns 1
    server.modes["/sam_vit_b_01ec64.pth"] = "404"
    data = yaml.safe_load((ROOT / "data_manifests" / "sam_checkpoints.yaml").read_text())
    data["models"]["vit_b"]["urls"] = [server.url("/sam_vit_b_01ec64.pth")]
    man = tmp_path / "sam.yaml"
    man.write_text(yaml.safe_dump(data))
    assert mf.main(["model", str(man), "vit_b", "--dest", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not fetch sam_vit_b_01ec64.pth") and "404" in err
    # any other error: one line naming the file, no traceback; --debug shows it
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [\n")
    assert mf.main(["dataset", str(bad), "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not valid YAML") and "Traceback" not in err
    monkeypatch.setattr(mf, "load_manifest", lambda path: 1 / 0)
    assert mf.main(["check", str(bad)]) == 1
    assert capsys.readouterr().err == (
        "error: ZeroDivisionError: division by zero (run with --debug for the traceback)\n"
    )
    assert mf.main(["--debug", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith(
        "error: ZeroDivisionError: division by zero\n"
    )


def test_command_line_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(mf, "load_manifest", interrupted)
    assert mf.main(["check", str(tmp_path / "m.yaml")]) == 130
    assert capsys.readouterr().err == "error: interrupted; rerun the same command to resume the download\n"


def test_prepare_dataset_skips_optional_files(tmp_path, ai4sf_archive):
    data = yaml.safe_load((ROOT / "data_manifests" / "ai4smallfarms.yaml").read_text())
    files = data["datasets"]["ai4smallfarms"]["files"]
    assert [f.get("optional", False) for f in files] == [False, True]
    files[0].update(
        urls=[str(ai4sf_archive)],
        sha256=sha256_file(ai4sf_archive),
        size_bytes=ai4sf_archive.stat().st_size,
    )
    files[1].update(urls=[str(tmp_path / "not-downloaded.parquet")])
    man = tmp_path / "m.yaml"
    man.write_text(yaml.safe_dump(data))
    ds = mf.prepare_dataset(man, "ai4smallfarms", tmp_path / "data", log=lambda m: None)
    assert sorted(p.name for p in (ds / "downloads").iterdir()) == [ai4sf_archive.name]
    with pytest.raises(mf.ChecksumError, match="record_checksum"):
        mf.prepare_dataset(man, "ai4smallfarms", tmp_path / "data", files=["ai4sf_fiboa.parquet"])
