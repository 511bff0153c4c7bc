"""Dataset and model manifests: load and validate them, download with resume, verify, unpack safely.

A manifest (``data_manifests/*.yaml``) describes where real data lives and how to trust it. The
downloader never leaves a half-written file under the final name (it writes ``<name>.part`` and
renames), resumes with HTTP ``Range``, tries mirrors in order, refuses an HTML page served instead
of data, checks the size and the SHA-256 (and the MD5 where upstream only publishes that), and
refuses a file whose checksum nobody has recorded unless told to record it.

``dataset_sources`` turns a downloaded and unpacked dataset into ``SceneSource`` rows that
``geo.prepare_scene`` consumes, exactly like the generated sample landscape.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import numpy as np
import requests
import yaml

from magseg_nb import files, geo
from magseg_nb.files import UnsafeNameError, safe_id, safe_path
from magseg_nb.geo import BACKGROUND_CLASSES  # the label vocabulary geo.read_labels accepts
from magseg_nb.labels import CLASSES

UNKNOWN = "unknown"
UNPACK_KINDS = ("zip", "tar", "none")
LAYOUT_KINDS = ("ai4smallfarms", "ftw")
LAYOUT_KEYS = {"ai4smallfarms": ("image_regex", "labels"), "ftw": ("image", "instance_mask")}
CHUNK = 1 << 20
NET_CHUNK = 1 << 16  # small network reads: a dropped connection loses at most this much
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class ManifestError(ValueError):
    """A manifest file is malformed: the message names the file and the key."""


class FetchError(RuntimeError):
    """A download failed on every URL: the message says what failed at each and what to do."""


class ChecksumError(FetchError):
    """The data arrived but does not match the manifest's checksum or size."""


class UnpackError(RuntimeError):
    """An archive is corrupt or tries to write outside its target folder."""


@dataclass(frozen=True)
class SceneSource:
    """One downloaded scene, ready for ``geo.prepare_scene(image_path, labels_path, out_dir, ...)``.

    ``class_map`` maps values of ``class_field`` in the labels file to our class names
    (``labels.CLASSES``; road/building/... count as others). ``split`` is the dataset's own split
    (train/val/test, None when it has none). ``presence_only`` is True where only fields were
    labelled, so pixels outside the polygons are unknown rather than "others" (NODATA).
    """

    scene_id: str
    country: str
    image_path: Path
    labels_path: Path
    layer: str | None
    class_field: str
    class_map: dict[str, str]
    split: str | None = None
    presence_only: bool = False


# --------------------------------------------------------------------------- manifests


def load_manifest(path: str | Path) -> dict:
    """Read and validate a manifest YAML; raises ManifestError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (look in data_manifests/ for the shipped ones)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not ({"datasets", "models"} & set(data)):
        raise ManifestError(f"{path}: top level must be a mapping with a 'datasets' and/or 'models' key")
    for section in ("datasets", "models"):
        if section not in data:
            continue
        items = data[section]
        if not isinstance(items, dict) or not items:
            raise ManifestError(f"{path}: '{section}' must be a non-empty mapping of name -> entry")
        for name, item in items.items():
            where = f"{section}.{name}"
            if not isinstance(item, dict):
                raise ManifestError(f"{path}: {where}: must be a mapping")
            try:
                safe_id(name, f"{section[:-1]} name")
            except UnsafeNameError as exc:
                raise ManifestError(f"{path}: {where}: {exc}") from None
            if section == "datasets":
                _validate_dataset(path, where, item)
            else:
                _validate_file(path, where, item, need_name=False)
    return data


def manifest_entry(manifest: dict | str | Path, section: str, name: str) -> dict:
    """One dataset or model entry by name (a clear error lists the names that exist)."""
    data = load_manifest(manifest) if not isinstance(manifest, dict) else manifest
    items = data.get(section) or {}
    if name not in items:
        raise ManifestError(f"no {section[:-1]} '{name}' in the manifest; it has: {sorted(items)}")
    return items[name]


def _require(path: Path, where: str, item: dict, key: str, types: type | tuple) -> object:
    if key not in item:
        raise ManifestError(f"{path}: {where}: missing key '{key}'")
    value = item[key]
    if not isinstance(value, types):
        raise ManifestError(f"{path}: {where}.{key}: expected {_type_names(types)}, got {value!r}")
    return value


def _type_names(types: type | tuple) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _validate_dataset(path: Path, where: str, item: dict) -> None:
    for key in ("title", "license", "citation", "homepage"):
        _require(path, where, item, key, str)
    countries = _require(path, where, item, "countries", list)
    if not countries or not all(isinstance(c, str) for c in countries):
        raise ManifestError(f"{path}: {where}.countries: expected a non-empty list of names")
    for country in countries:
        try:
            safe_id(country, "country")
        except UnsafeNameError as exc:
            raise ManifestError(f"{path}: {where}.countries: {exc}") from None
    imagery = _require(path, where, item, "imagery", dict)
    _require(path, f"{where}.imagery", imagery, "source", str)
    _require(path, f"{where}.imagery", imagery, "resolution_m", (int, float))
    files = _require(path, where, item, "files", list)
    if not files:
        raise ManifestError(f"{path}: {where}.files: needs at least one file")
    names = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: {where}.files[{i}]: must be a mapping")
        _validate_file(path, f"{where}.files[{i}]", entry, need_name=True)
        if entry["name"] in names:
            raise ManifestError(f"{path}: {where}.files[{i}].name: duplicate file name {entry['name']!r}")
        names.add(entry["name"])
    labels = _require(path, where, item, "labels", dict)
    fmt = _require(path, f"{where}.labels", labels, "format", str)
    if fmt not in ("gpkg", "raster"):
        raise ManifestError(f"{path}: {where}.labels.format: expected 'gpkg' or 'raster', got {fmt!r}")
    _require(path, f"{where}.labels", labels, "class_field", str)
    class_map = _require(path, f"{where}.labels", labels, "class_map", dict)

    allowed = set(CLASSES) | set(BACKGROUND_CLASSES)
    for src, dst in class_map.items():
        if dst not in allowed:
            raise ManifestError(
                f"{path}: {where}.labels.class_map[{src!r}]: {dst!r} is not one of {sorted(allowed)}"
            )
    layout = _require(path, where, item, "layout", dict)
    kind = _require(path, f"{where}.layout", layout, "kind", str)
    if kind not in LAYOUT_KINDS:
        raise ManifestError(f"{path}: {where}.layout.kind: expected one of {LAYOUT_KINDS}, got {kind!r}")
    rgb = _require(path, f"{where}.layout", layout, "rgb_bands", list)
    if len(rgb) != 3 or not all(isinstance(b, int) and b >= 1 for b in rgb):
        raise ManifestError(f"{path}: {where}.layout.rgb_bands: expected three 1-based band numbers")
    for key in LAYOUT_KEYS[kind]:
        _require(path, f"{where}.layout", layout, key, str)
    if kind == "ai4smallfarms":
        try:
            groups = set(re.compile(layout["image_regex"]).groupindex)
        except re.error as exc:
            raise ManifestError(
                f"{path}: {where}.layout.image_regex: not a regular expression ({exc})"
            ) from exc
        if not {"split", "tile", "country"} <= groups:
            raise ManifestError(
                f"{path}: {where}.layout.image_regex: needs the named groups split, tile and country"
            )


def _validate_file(path: Path, where: str, entry: dict, need_name: bool) -> None:
    key = "name" if need_name else "filename"
    name = _require(path, where, entry, key, str)
    try:
        safe_id(name, "file name")
    except UnsafeNameError as exc:
        raise ManifestError(f"{path}: {where}.{key}: must be a plain file name ({exc})") from None
    urls = _require(path, where, entry, "urls", list)
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise ManifestError(f"{path}: {where}.urls: expected a non-empty list of URLs (primary first)")
    sha = _require(path, where, entry, "sha256", str)
    if sha != UNKNOWN and not _HEX64.match(sha):
        raise ManifestError(
            f"{path}: {where}.sha256: expected 64 lowercase hex digits or 'unknown', got {sha!r}"
        )
    if "md5" in entry and not (isinstance(entry["md5"], str) and _HEX32.match(entry["md5"])):
        raise ManifestError(f"{path}: {where}.md5: expected 32 lowercase hex digits, got {entry['md5']!r}")
    size = _require(path, where, entry, "size_bytes", (int, str))
    if (
        isinstance(size, bool)
        or (isinstance(size, str) and size != UNKNOWN)
        or (isinstance(size, int) and size <= 0)
    ):
        raise ManifestError(
            f"{path}: {where}.size_bytes: expected a positive integer or 'unknown', got {size!r}"
        )
    unpack = entry.get("unpack", "none")
    if unpack not in UNPACK_KINDS:
        raise ManifestError(f"{path}: {where}.unpack: expected one of {UNPACK_KINDS}, got {unpack!r}")
    target = entry.get("unpack_to")
    if target is not None:
        parts = PurePosixPath(str(target)).parts
        if (
            not isinstance(target, str)
            or not parts
            or PurePosixPath(target).is_absolute()
            or not all(_is_safe(p) for p in parts)
        ):
            raise ManifestError(
                f"{path}: {where}.unpack_to: expected a relative folder of plain names (letters, digits, . _ + = -; no '..'), got {target!r}"
            )


def _is_safe(name: str) -> bool:
    try:
        safe_id(name)
    except UnsafeNameError:
        return False
    return True


# --------------------------------------------------------------------------- download


def _entry_name(entry: dict) -> str:
    return entry.get("name") or entry.get("filename")


def _known(value: object) -> bool:
    return value not in (None, UNKNOWN)


def fetch(
    entry: dict,
    dest_dir: str | Path,
    allow_unknown_checksum: bool = False,
    record_checksum: bool = False,
    *,
    timeout: float = 60.0,
    session: requests.Session | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Download one manifest file entry into ``dest_dir`` and return the verified file's path.

    URLs are tried in order (``http(s)://``, ``file://`` or a plain local path). A ``.part`` file
    is resumed with HTTP Range and renamed into place only after the size and checksum match.
    A file whose sha256 is "unknown" (and has no md5) is refused unless ``record_checksum`` (download,
    print its sha256 for the manifest and write ``<name>.sha256`` beside it) or
    ``allow_unknown_checksum`` (use it unverified). With an md5 only, the md5 is verified and
    ``record_checksum`` still records the sha256.
    """
    name = _entry_name(entry)
    if not name or not entry.get("urls"):
        raise FetchError(f"manifest entry {entry!r} needs a 'name' (or 'filename') and 'urls'")
    try:
        safe_id(name, "file name")
    except UnsafeNameError as exc:
        raise FetchError(f"manifest entry {name!r}: {exc}") from None
    sha, md5, size = entry.get("sha256", UNKNOWN), entry.get("md5"), entry.get("size_bytes", UNKNOWN)
    trusted = _known(sha) or _known(md5)
    if not trusted and not (allow_unknown_checksum or record_checksum):
        raise ChecksumError(
            f"{name}: the manifest has no checksum for this file (sha256: unknown), so a download could not "
            "be trusted. Run fetch(..., record_checksum=True) to download it once and print its sha256 to "
            "put into the manifest, or fetch(..., allow_unknown_checksum=True) to use it unverified."
        )
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    part = dest_dir / (name + ".part")

    if final.exists():
        problem = _verify(final, sha, md5, size)
        if problem is None:
            _maybe_report(final, sha, trusted, record_checksum, log)
            return final
        raise ChecksumError(
            f"{final} already exists but {problem}. It is not the file the manifest describes: delete it "
            "to download again, or fix the manifest if you trust this file."
        )

    failures = []
    for url in entry["urls"]:
        try:
            if _is_local(url):
                _copy_local(url, part, size)
            else:
                _download_http(url, part, size, name, timeout, session or requests.Session(), log)
        except FetchError as exc:
            failures.append(f"  {url}: {exc}")
            continue
        problem = _verify(part, sha, md5, size)
        if problem is not None:
            part.unlink(missing_ok=True)  # a wrong file must not be resumed from
            failures.append(
                f"  {url}: {problem}. The file changed upstream or the mirror serves something else; "
                "if you trust the new file, put its checksum into the manifest"
            )
            continue
        files.move(part, final)
        _maybe_report(final, sha, trusted, record_checksum, log)
        return final
    raise FetchError(f"could not fetch {name} from any URL:\n" + "\n".join(failures))


def _maybe_report(path: Path, sha: str, trusted: bool, record: bool, log: Callable[[str], None]) -> None:
    """Without a sha256 in the manifest: record it when asked, warn when nothing verified the file."""
    if _known(sha) or (trusted and not record):
        return
    digest = files.sha256_file(path)
    if record:
        files.write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
        log(f"sha256 of {path.name}: {digest}  (put this into the manifest as its sha256)")
    else:
        log(f"WARNING: {path.name} is NOT verified (no checksum in the manifest); its sha256 is {digest}")


def _verify(path: Path, sha: str, md5: str | None, size: object) -> str | None:
    """None when the file matches; otherwise what is wrong, in words."""
    actual_size = path.stat().st_size
    if _known(size) and actual_size != int(size):
        return f"its size is {actual_size} bytes, the manifest says {size}"
    if _known(sha):
        got = files.sha256_file(path)
        if got != sha:
            return f"sha256 mismatch: expected {sha}, got {got}"
    elif _known(md5):
        got = files.sha256_file(path, "md5")
        if got != md5:
            return f"md5 mismatch: expected {md5}, got {got}"
    return None


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme.lower()
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    return Path(unquote(parsed.path)) if parsed.scheme.lower() == "file" else Path(url).expanduser()


def _copy_local(url: str, part: Path, size: object) -> None:
    src = _local_path(url)
    if not src.is_file():
        raise FetchError(f"local file {src} does not exist (give the full path of the downloaded file)")
    if _known(size) and src.stat().st_size != int(size):
        raise FetchError(f"local file {src} has {src.stat().st_size} bytes, the manifest says {size}")
    with files.atomic(part) as tmp:
        shutil.copyfile(src, tmp)


def _looks_like_html(first: bytes) -> bool:
    head = first[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        head.startswith(b"<?xml") and b"<html" in head
    )


def _http_error(status: int, url: str) -> str:
    if status in (401, 403):
        return (
            f"HTTP {status} (access denied): the file may be gated (log in / accept the licence on the "
            "dataset's page) or the server blocks this client. Download it in a browser and pass its path "
            "as the url (file:///... or a plain path)"
        )
    if status == 404:
        return (
            "HTTP 404 (not found): the file moved upstream; check the dataset's homepage and update the URL"
        )
    if status == 429 or status >= 500:
        return f"HTTP {status}: the server is busy or failing; try again later (the .part file is kept and resumed)"
    return f"HTTP {status}"


def _download_http(
    url: str,
    part: Path,
    size: object,
    name: str,
    timeout: float,
    session: requests.Session,
    log: Callable[[str], None],
) -> None:
    """Fill ``part`` from ``url``, resuming from its current length when the server allows Range."""
    have = part.stat().st_size if part.exists() else 0
    if _known(size) and have > int(size):
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except requests.RequestException as exc:
        raise FetchError(
            f"connection failed ({exc.__class__.__name__}: {exc}); check the network and retry"
        ) from exc
    with resp:
        if resp.status_code == 416 and have:
            # Range not satisfiable: the .part is probably complete already; verification decides.
            return
        if resp.status_code >= 400:
            raise FetchError(_http_error(resp.status_code, url))
        ctype = resp.headers.get("Content-Type", "").lower()
        if "text/html" in ctype and not name.lower().endswith((".html", ".htm")):
            raise FetchError(
                "the server sent an HTML page instead of the data (a login, licence, quota or error page). "
                "Open the URL in a browser to see why; if the file is gated, download it by hand and pass its path"
            )
        append = resp.status_code == 206 and have > 0
        if have and not append:
            log(f"{name}: server ignored the Range request; downloading from the start")
        chunks = resp.iter_content(NET_CHUNK)
        try:
            # Look at the first bytes before anything else: an HTML page is the most useful diagnosis.
            first = next(chunks, b"")
            if not append and _looks_like_html(first):
                raise FetchError(
                    "the response body is an HTML page, not the data (an error or login page served "
                    "with status 200). Open the URL in a browser; download by hand if access is gated"
                )
            total = _reported_total(resp, have if append else 0)
            if total is not None and _known(size) and total != int(size):
                raise FetchError(
                    f"the server reports {total} bytes but the manifest says {size}: the file changed "
                    "upstream or this URL serves another file"
                )
            with open(part, "ab" if append else "wb") as out:
                out.write(first)
                for chunk in chunks:
                    out.write(chunk)
        except requests.RequestException as exc:
            got = part.stat().st_size if part.exists() else 0
            raise FetchError(
                f"the connection dropped after {got} bytes ({exc.__class__.__name__}); "
                "run again to resume from the .part file"
            ) from exc
    got = part.stat().st_size
    if total is not None and got != total:
        raise FetchError(
            f"the connection ended after {got} of {total} bytes; run again to resume from the .part file"
        )


def _reported_total(resp: requests.Response, offset: int) -> int | None:
    """Full file size the server claims (from Content-Range or Content-Length), if any."""
    crange = resp.headers.get("Content-Range", "")
    m = re.match(r"bytes\s+\d+-\d+/(\d+)", crange)
    if m:
        return int(m.group(1))
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and "gzip" not in resp.headers.get("Content-Encoding", ""):
        return offset + int(length)
    return None


# --------------------------------------------------------------------------- unpack


UNPACK_RECORD = ".magseg-unpacked.json"  # written last into an unpacked folder: what it holds


def _unpacked_problem(archive: Path, target: Path) -> str | None:
    """None when ``target`` is a complete unpack of this ``archive``; otherwise what is wrong."""
    try:
        record = json.loads((target / UNPACK_RECORD).read_text())
        listing = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no record of a finished unpack (interrupted, or unpacked by something else)"
    stat = archive.stat()
    if record.get("archive") != archive.name or record.get("archive_size") != stat.st_size:
        return f"it was unpacked from another archive ({record.get('archive')}, {record.get('archive_size')} bytes)"
    if record.get("archive_mtime_ns") != stat.st_mtime_ns:
        return f"{archive.name} was downloaded again after it was unpacked"
    for rel, size in listing.items():
        path = target / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the archive has {size}"
    return None


def unpack(
    archive: str | Path, target: str | Path, kind: str | None = None, log: Callable[[str], None] = print
) -> Path:
    """Extract a zip or tar archive into ``target`` and return it.

    Members with absolute paths, ``..`` parts or links are refused before anything is written.
    Extraction goes to ``<target>.partial`` first, then a record of the archive and of every
    unpacked file (with its size) is written there, and only then is it renamed to ``target``. An
    existing ``target`` is reused only when its record matches the archive and every listed file is
    there with its size; otherwise (interrupted, damaged, or from an older download) it is unpacked
    again, and the old folder is replaced only once the new one is complete.
    """
    archive, target = Path(archive), Path(target)
    if target.exists():
        problem = _unpacked_problem(archive, target)
        if problem is None:
            log(f"{target} is already unpacked from {archive.name}")
            return target
        log(f"{target}: {problem}; unpacking {archive.name} again")
    else:
        log(f"unpacking {archive.name} -> {target}")
    advice = f"delete {archive} and fetch again (the same command downloads and unpacks it anew)"
    kind = kind or ("zip" if zipfile.is_zipfile(archive) else "tar" if tarfile.is_tarfile(archive) else None)
    if kind not in ("zip", "tar"):
        raise UnpackError(f"{archive}: not a zip or tar archive (corrupt or incomplete download?); {advice}")
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if kind == "zip":
            _unzip(archive, tmp)
        else:
            _untar(archive, tmp)
        listing = {
            p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        stat = archive.stat()
        record = {
            "archive": archive.name,
            "archive_size": stat.st_size,
            "archive_mtime_ns": stat.st_mtime_ns,
            "files": listing,
        }
        files.write_json(tmp / UNPACK_RECORD, record)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UnpackError(f"{archive}: cannot be unpacked ({exc}); {advice}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files.replace_dir(tmp, target)


def _check_member(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name):
        raise UnpackError(
            f"{archive}: refusing member {name!r}: it would be written outside the target folder"
        )


def _unzip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_member(archive, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UnpackError(
                    f"{archive}: refusing member {info.filename!r}: symbolic links are not allowed"
                )
        zf.extractall(dest)


def _untar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            _check_member(archive, member.name)
            if member.issym() or member.islnk() or member.isdev():
                raise UnpackError(
                    f"{archive}: refusing member {member.name!r}: links and devices are not allowed"
                )
        tf.extractall(dest, filter="data")


# --------------------------------------------------------------------------- datasets


def prepare_dataset(
    manifest_path: str | Path,
    dataset: str,
    data_root: str | Path,
    files: list[str] | None = None,
    allow_unknown_checksum: bool = False,
    record_checksum: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch and unpack a dataset's files (those not marked ``optional``, or those named in ``files``).

    Returns the dataset's folder.
    Layout: ``<data_root>/<dataset>/downloads/<file>`` and ``<data_root>/<dataset>/<unpack_to>/``.
    """
    ds_dir = safe_path(data_root, dataset, what="dataset name")
    spec = manifest_entry(manifest_path, "datasets", dataset)
    entries = spec["files"]
    if files is not None:
        known = {e["name"] for e in entries}
        missing = sorted(set(files) - known)
        if missing:
            raise ManifestError(
                f"{manifest_path}: datasets.{dataset}.files has no {missing}; it has {sorted(known)}"
            )
        entries = [e for e in entries if e["name"] in files]
    else:
        entries = [e for e in entries if not e.get("optional", False)]
    for entry in entries:
        path = fetch(entry, ds_dir / "downloads", allow_unknown_checksum, record_checksum, log=log)
        if entry.get("unpack", "none") != "none":
            target = ds_dir / entry.get("unpack_to", Path(entry["name"]).stem)
            unpack(path, target, entry["unpack"], log=log)
    return ds_dir


def dataset_sources(
    manifest_path: str | Path, dataset: str, data_root: str | Path, log: Callable[[str], None] = print
) -> list[SceneSource]:
    """List the scenes of a downloaded + unpacked dataset as SceneSource rows for geo.prepare_scene.

    Looks in ``<data_root>/<dataset>`` (or ``data_root`` itself when that folder does not exist, so
    data already on disk can be pointed at directly). Images that are not already RGB uint8 get an
    RGB uint8 copy (bands from ``layout.rgb_bands``, 2-98 percentile stretch) under
    ``<dataset dir>/derived/``; raster labels are polygonized there into a GeoPackage.
    """
    root = safe_path(data_root, dataset, what="dataset name")
    spec = manifest_entry(manifest_path, "datasets", dataset)
    if not root.is_dir():
        root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: no data for '{dataset}'. Download it first: "
            f"manifest.prepare_dataset({str(manifest_path)!r}, {dataset!r}, {str(data_root)!r})"
        )
    kind = spec["layout"]["kind"]
    sources = _sources_ai4smallfarms(spec, root) if kind == "ai4smallfarms" else _sources_ftw(spec, root, log)
    if not sources:
        raise FileNotFoundError(
            f"{root}: found no scenes of '{dataset}' (expected the layout described under "
            f"datasets.{dataset}.layout in {manifest_path}); is the archive unpacked?"
        )
    seen: dict[str, Path] = {}
    for s in sources:
        if s.scene_id in seen:
            raise ValueError(
                f"scene {s.scene_id} found twice under {root}: {seen[s.scene_id]} and {s.image_path}. "
                "Keep one copy of the dataset there (or point data_root at one of them)."
            )
        seen[s.scene_id] = s.image_path
    return sources


def _derived_dir(root: Path) -> Path:
    return root / "derived"


def _sources_ai4smallfarms(spec: dict, root: Path) -> list[SceneSource]:
    layout, labels = spec["layout"], spec["labels"]
    name_re = re.compile(layout["image_regex"])
    out = []
    # The archive's top folder (e.g. sentinel-2-asia/) may sit at any depth below root.
    for image in sorted(root.rglob("*.tif")):
        if _derived_dir(root) in image.parents:
            continue
        rel = image.relative_to(root).as_posix()
        m = name_re.search(rel)
        if not m:
            continue
        base = image.parents[2]  # <base>/<split>/images/<tile>.tif
        labels_path = base / layout["labels"].format(stem=image.stem, **m.groupdict())
        if not labels_path.is_file():
            raise FileNotFoundError(
                f"{image}: no labels file {labels_path} (is the reference/ folder unpacked?)"
            )
        country = m.group("country")
        scene_id = safe_id(f"{country}_{m.group('tile')}", f"scene id of {image}")
        out.append(
            SceneSource(
                scene_id=scene_id,
                country=country,
                image_path=_rgb_image(image, layout["rgb_bands"], _derived_dir(root) / image.stem),
                labels_path=labels_path,
                layer=labels.get("layer"),
                class_field=labels["class_field"],
                class_map=dict(labels["class_map"]),
                split=layout.get("split_names", {}).get(m.group("split"), m.group("split")),
                presence_only=bool(labels.get("presence_only", False)),
            )
        )
    return out


def _sources_ftw(spec: dict, root: Path, log: Callable[[str], None]) -> list[SceneSource]:
    import pandas as pd

    layout, labels = spec["layout"], spec["labels"]
    presence_only = set(labels.get("presence_only_countries", []))
    out, empty = [], 0
    for chips in sorted(root.rglob("chips_*.parquet")):
        country = chips.stem.removeprefix("chips_")
        if country not in spec["countries"]:
            continue
        cdir = chips.parent
        try:
            table = pd.read_parquet(chips, columns=["aoi_id", "split"])
        except (KeyError, ValueError, OSError) as exc:
            raise ValueError(
                f"{chips}: cannot read columns aoi_id and split ({exc}); is the file complete?"
            ) from exc
        for aoi, split in zip(table["aoi_id"].astype(str), table["split"].astype(str), strict=True):
            safe_id(aoi, f"aoi_id in {chips}")  # it becomes a folder (derived/<country>/<aoi>) and a scene id
            image = cdir / layout["image"].format(aoi=aoi)
            mask = cdir / layout["instance_mask"].format(aoi=aoi)
            if not (image.is_file() and mask.is_file()):
                continue  # upstream: some AOIs have no imagery (torchgeo's FTW loader skips them too)
            derived = safe_path(_derived_dir(root), country, aoi, what=f"aoi_id in {chips}")
            labels_path, n_fields = _polygonize_instances(mask, derived / "labels.gpkg")
            if n_fields == 0:
                empty += 1  # geo.prepare_scene needs at least one polygon per scene
                continue
            out.append(
                SceneSource(
                    scene_id=f"{country}_{aoi}",
                    country=country,
                    image_path=_rgb_image(image, layout["rgb_bands"], derived),
                    labels_path=labels_path,
                    layer="labels",
                    class_field=labels["class_field"],
                    class_map=dict(labels["class_map"]),
                    split=None if split == "none" else split,
                    presence_only=country in presence_only,
                )
            )
    if empty:
        log(f"skipped {empty} FTW chip(s) without any field polygon")
    return out


def _fresh(derived: Path, source: Path) -> bool:
    return derived.exists() and derived.stat().st_mtime >= source.stat().st_mtime


def _rgb_image(image: Path, bands: list[int], derived_dir: Path) -> Path:
    """The image itself when it is RGB uint8 already, else a cached RGB uint8 copy (same grid, CRS)."""
    import rasterio

    with rasterio.open(image) as src:
        if src.count == 3 and all(d == "uint8" for d in src.dtypes) and list(bands) == [1, 2, 3]:
            return image
        if src.crs is None:
            raise ValueError(f"{image}: the raster has no CRS; the dataset files look damaged (fetch again)")
        if max(bands) > src.count:
            raise ValueError(f"{image}: has {src.count} bands but the manifest's layout.rgb_bands is {bands}")
        out = derived_dir / "image_rgb.tif"
        if _fresh(out, image):
            return out
        data = src.read(bands, masked=True).astype("float32")
        profile = src.profile.copy()
    rgb = np.zeros(data.shape, dtype=np.uint8)
    for i, band in enumerate(data):
        valid = band.compressed()
        if valid.size:
            lo, hi = np.percentile(valid, [2, 98])
            scaled = (band.filled(lo) - lo) / max(hi - lo, 1e-6) * 255.0
            rgb[i] = np.clip(scaled, 0, 255).astype(np.uint8)

    return geo.write_geotiff(out, rgb, profile["crs"], profile["transform"])


def _polygonize_instances(mask: Path, out: Path) -> tuple[Path, int]:
    """Field polygons (class 'field', field_id = instance id) from an instance-id raster, cached.

    Returns the GeoPackage and its number of fields.
    """
    import geopandas as gpd

    if _fresh(out, mask):
        return out, len(gpd.read_file(out, layer="labels", columns=["field_id"]))
    import rasterio
    from rasterio import features
    from shapely.geometry import shape

    with rasterio.open(mask) as src:
        ids = src.read(1)
        if src.crs is None:
            raise ValueError(
                f"{mask}: the instance mask has no CRS; the dataset files look damaged (fetch again)"
            )
        geoms, values = [], []
        for geom, value in features.shapes(ids.astype("int32"), mask=ids > 0, transform=src.transform):
            geoms.append(shape(geom))
            values.append(int(value))
        crs = src.crs
    columns = {
        "class": np.array(["field"] * len(values), dtype=object),
        "field_id": np.array(values, dtype=np.int64),
    }
    gdf = gpd.GeoDataFrame(columns, geometry=geoms, crs=crs)  # may be empty: a chip without fields
    # One row per field even when a field's pixels are not 4-connected.
    gdf = gdf.dissolve(by="field_id", as_index=False)[["class", "field_id", "geometry"]] if len(gdf) else gdf

    return geo.write_vector(gdf, out, layer="labels"), len(gdf)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m magseg_nb.manifest check|dataset|model ...`` (see --help)."""

    parser = argparse.ArgumentParser(prog="python -m magseg_nb.manifest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate manifests (default: data_manifests/*.yaml)")
    check.add_argument("paths", nargs="*", type=Path)
    for cmd in ("dataset", "model"):
        p = sub.add_parser(cmd, help=f"fetch a {cmd} listed in a manifest")
        p.add_argument("manifest", type=Path)
        p.add_argument("name")
        p.add_argument("--dest", type=Path, default=Path("data") if cmd == "dataset" else Path("models"))
        p.add_argument(
            "--record-checksum", action="store_true", help="download files without a sha256 and print it"
        )
        p.add_argument(
            "--allow-unknown-checksum", action="store_true", help="use files without a checksum unverified"
        )
        if cmd == "dataset":
            p.add_argument("--files", nargs="+", help="only these file names (e.g. india.zip)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "check":
            paths = args.paths or sorted(Path("data_manifests").glob("*.yaml"))
            for path in paths:
                load_manifest(path)
                print(f"ok  {path}")
        elif args.cmd == "dataset":
            folder = prepare_dataset(
                args.manifest,
                args.name,
                args.dest,
                args.files,
                args.allow_unknown_checksum,
                args.record_checksum,
            )
            print(
                f"{args.name}: {len(dataset_sources(args.manifest, args.name, args.dest))} scenes in {folder}"
            )
        else:
            entry = manifest_entry(args.manifest, "models", args.name)
            print(fetch(entry, args.dest, args.allow_unknown_checksum, args.record_checksum))
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume the download", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the top of the program: one clear message
        if args.debug:
            traceback.print_exception(exc)
        expected = (ManifestError, FetchError, UnpackError, UnsafeNameError, FileNotFoundError)
        text = str(exc) if isinstance(exc, expected) else f"{type(exc).__name__}: {exc}"
        hint = "" if args.debug or isinstance(exc, expected) else " (run with --debug for the traceback)"
        print(f"error: {text}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
