"""Find the training examples in a data folder, and say exactly why each unusable file was skipped.

One folder may mix the supported layouts (nested folders allowed everywhere):

    a.png + a.txt                 image + same-name caption
    metadata.jsonl                HF ImageFolder: {"file_name": "a.png", "text": "..."} per line
    shard-000.tar                 webdataset: key.jpg|png|webp + key.txt|json
    cats/a.png, dogs/b.png        no captions + one sub-folder per class -> class labels
    a.png                         no captions at all -> unconditional

`scan(data_dir) -> (items, skipped)`. Bad data never raises: every file that cannot be used
becomes a `Skip(path, reason, detail)` with a stable short `reason` code (`REASONS`).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

from .. import io, textfile
from ..config import LABELS  # scan(labels=): where class labels come from (see scan)
from ..errors import UserError
from .images import IMAGE_EXTENSIONS, MAX_PIXELS, MIN_SIZE, BadImage, load_image, open_checked, to_rgb

__all__ = ["Item", "Skip", "scan", "load_image", "class_names", "write_skipped", "summary", "REASONS"]

REASONS = {
    "zero_bytes": "the file is empty",
    "not_image": "an image extension, but the content is not an image",
    "wrong_extension": "an image whose extension does not match its format",
    "unsupported_extension": "not an image, caption or metadata file",
    "truncated": "the image data ends early",
    "decode_error": "the image data cannot be decoded",
    "too_small": "the shorter side is under the minimum size",
    "below_bucket": "smaller than its aspect-ratio bucket by more than the upscale limit",
    "decompression_bomb": "width x height is over the pixel limit",
    "caption_not_utf8": "the caption file is not text (UTF-8, or UTF-16/UTF-8 with a byte-order mark)",
    "caption_bad_json": "a webdataset .json caption is not a JSON object with a caption",
    "caption_without_image": "a caption file with no image of the same name",
    "symlink_loop": "a symbolic link that leads back to itself or a parent folder",
    "broken_symlink": "a symbolic link to nothing",
    "duplicate_folder": "a folder reached a second time through a symbolic link",
    "unreadable": "no permission to read",
    "metadata_bad_line": "a metadata.jsonl line that is not a JSON object with file_name and caption",
    "missing_file": "metadata.jsonl names a file that does not exist",
    "not_in_metadata": "an image in a metadata.jsonl folder that the metadata does not list",
    "bad_tar": "a .tar shard that cannot be read",
    "no_class_folder": "class labels from folders, but the image is not in a sub-folder",
}
IGNORED_EXTENSIONS = {".json", ".jsonl", ".md", ".csv"}  # notes and metadata next to the data


@dataclass(frozen=True)
class Item:
    """One usable example. `caption` None = unconditional; `label` indexes `class_names(items)`."""

    id: str  # stable key: path relative to the data folder ("a/b.png", "shard.tar/key")
    path: str  # the file on disk (the .tar for a webdataset member)
    name: str  # file or member name (gives the extension)
    caption: Optional[str] = None
    label: Optional[int] = None
    class_name: Optional[str] = None
    offset: int = -1  # tar members: where the bytes are inside `path`
    nbytes: int = -1

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.nbytes)


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str  # a key of REASONS
    detail: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


# ---- walking the folder --------------------------------------------------------------------


def _walk(root: str, skipped: List[Skip]) -> List[str]:
    """Regular files under root (following symlinks, safely), sorted; problems go to `skipped`."""
    files: List[str] = []
    seen = set()

    def visit(d: str, ancestors: Tuple[Tuple[int, int], ...]) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except PermissionError as e:
            skipped.append(Skip(d, "unreadable", f"cannot list the folder: {e.strerror}"))
            return
        for e in entries:
            if e.name.startswith("."):
                continue  # hidden files: .DS_Store, .git, editor swap files
            try:
                st = os.stat(e.path)  # follows symlinks
            except OSError as err:
                reason = {errno.ELOOP: "symlink_loop", errno.ENOENT: "broken_symlink"}.get(err.errno, "unreadable")
                skipped.append(Skip(e.path, reason, f"{err.strerror} (link to {_readlink(e.path)})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    skipped.append(Skip(e.path, "symlink_loop", f"links back to the parent folder {_readlink(e.path)}"))
                elif key in seen:
                    skipped.append(Skip(e.path, "duplicate_folder", f"already read as {_readlink(e.path)}"))
                else:
                    seen.add(key)
                    visit(e.path, ancestors + (key,))
            elif stat.S_ISREG(st.st_mode):
                files.append(e.path)

    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    visit(root, ((st.st_dev, st.st_ino),))
    return files


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return path


def _read_caption(path: str, skipped: List[Skip]) -> Optional[str]:
    if not os.access(path, os.R_OK):
        skipped.append(Skip(path, "unreadable", "no read permission"))
        return None
    try:
        with open(path, "rb") as f:
            return textfile.decode(f.read()).strip()  # UTF-8, or UTF-16 with its byte-order mark (Notepad)
    except textfile.TextFileError as e:
        skipped.append(Skip(path, "caption_not_utf8", str(e)))
    except PermissionError as e:
        skipped.append(Skip(path, "unreadable", e.strerror or "permission denied"))
    return None


# ---- the three layouts ---------------------------------------------------------------------


def _read_metadata(path: str, column: str, skipped: List[Skip]) -> Dict[str, str]:
    """metadata.jsonl -> {absolute image path: caption}."""
    folder, out = os.path.dirname(path), {}
    text = _read_caption(path, skipped)
    for n, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append(Skip(where, "metadata_bad_line", f"not JSON: {e.msg}"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            skipped.append(Skip(where, "metadata_bad_line", "no \"file_name\" string"))
            continue
        if not isinstance(row.get(column), str):
            skipped.append(Skip(where, "metadata_bad_line", f"no {column!r} caption string (see --caption-column)"))
            continue
        image = os.path.normpath(os.path.join(folder, row["file_name"]))
        if not os.path.isfile(image):
            skipped.append(Skip(image, "missing_file", f"listed in {where} but not found"))
            continue
        out[image] = row[column].strip()
    return out


def _tar_items(path: str, rel: str, column: str, skipped: List[Skip]) -> List[Item]:
    """webdataset shard: members grouped by key (the name up to the first dot of the basename)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped.append(Skip(path, "bad_tar", str(e) or type(e).__name__))
        return []
    groups: Dict[str, Dict[str, tarfile.TarInfo]] = {}
    for m in members:
        folder, base = os.path.split(m.name)
        stem, _, ext = base.partition(".")
        groups.setdefault(os.path.join(folder, stem), {})["." + ext.lower()] = m
    items = []
    with open(path, "rb") as f:
        def read(m):
            f.seek(m.offset_data)
            return f.read(m.size)

        for key, parts in sorted(groups.items()):
            image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
            caption = _tar_caption(path, parts, column, read, skipped)
            if image is None:
                if caption is not None:
                    skipped.append(Skip(f"{path}/{key}", "caption_without_image", "no image member with this key"))
                continue
            items.append(Item(f"{rel}/{key}", path, image.name, caption, offset=image.offset_data, nbytes=image.size))
    return items


def _tar_caption(path, parts, column, read, skipped) -> Optional[str]:
    if ".txt" in parts:
        try:
            return textfile.decode(read(parts[".txt"])).strip()
        except textfile.TextFileError as e:
            skipped.append(Skip(f"{path}/{parts['.txt'].name}", "caption_not_utf8", str(e)))
            return None
    if ".json" in parts:
        try:
            row = json.loads(read(parts[".json"]).decode("utf-8"))
            for k in (column, "caption", "text"):
                if isinstance(row, dict) and isinstance(row.get(k), str):
                    return row[k].strip()
            raise ValueError(f"no {column!r} / \"caption\" string")
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            skipped.append(Skip(f"{path}/{parts['.json'].name}", "caption_bad_json", str(e)))
    return None


# ---- scan ----------------------------------------------------------------------------------


def scan(data_dir: str, caption_column: str = "text", labels: str = "auto", min_size: int = MIN_SIZE,
         max_pixels: int = MAX_PIXELS, verify: bool = False) -> Tuple[List[Item], List[Skip]]:
    """Every usable example under `data_dir`, and every skipped file with its reason.

    Images are checked from their header (format, extension, size, pixel count); `verify=True`
    also decodes the pixels (finds truncated files; `load_image` finds them otherwise).
    labels: "auto" (class folders when there are no captions and every image is in one of >= 2
    sub-folders), "folders" (always) or "none".
    """
    if labels not in LABELS:
        raise UserError(f"labels={labels!r}: choose one of {', '.join(LABELS)}")
    if not os.path.isdir(data_dir):
        raise UserError(f"{data_dir}: not a data folder — pass a folder of images (see `latentforge cache --help`)")
    root = os.path.abspath(data_dir)
    skipped: List[Skip] = []
    files = _walk(root, skipped)
    by_ext: Dict[str, List[str]] = {}
    for f in files:
        by_ext.setdefault(os.path.splitext(f)[1].lower(), []).append(f)

    metadata: Dict[str, str] = {}
    meta_dirs = [os.path.dirname(f) for f in files if os.path.basename(f) == "metadata.jsonl"]
    for d in meta_dirs:
        metadata.update(_read_metadata(os.path.join(d, "metadata.jsonl"), caption_column, skipped))

    items: List[Item] = []
    images = sorted(f for e in IMAGE_EXTENSIONS for f in by_ext.get(e, []))
    stems = {os.path.splitext(f)[0] for f in images}
    for txt in by_ext.get(".txt", []):
        if os.path.splitext(txt)[0] not in stems:
            skipped.append(Skip(txt, "caption_without_image", "no image with the same name next to it"))
    for path in images:
        item = _image_item(path, root, metadata, meta_dirs, skipped)
        if item is not None:
            items.append(item)
    for path in by_ext.get(".tar", []):
        items += _tar_items(path, os.path.relpath(path, root).replace(os.sep, "/"), caption_column, skipped)
    for ext, paths in by_ext.items():
        if ext not in IMAGE_EXTENSIONS and ext not in IGNORED_EXTENSIONS and ext not in (".txt", ".tar"):
            skipped += [Skip(p, "unsupported_extension", f"{ext or 'no extension'} is not an image (use "
                              f"{', '.join(IMAGE_EXTENSIONS)})") for p in paths]

    items = [it for it in items if _check(it, min_size, max_pixels, verify, skipped)]
    items = _conditioning(items, labels, skipped)
    return sorted(items, key=lambda it: it.id), sorted(skipped, key=lambda s: (s.path, s.reason))


def _image_item(path, root, metadata, meta_dirs, skipped) -> Optional[Item]:
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    caption = metadata.get(path)
    if caption is None:
        txt = os.path.splitext(path)[0] + ".txt"
        if os.path.exists(txt):
            caption = _read_caption(txt, skipped)
            if caption is None:  # the caption is unusable, so is the pair
                return None
        elif any(path.startswith(d + os.sep) for d in meta_dirs):
            skipped.append(Skip(path, "not_in_metadata", "add a line for it to metadata.jsonl"))
            return None
    return Item(rel, path, os.path.basename(path), caption)


def _check(item: Item, min_size: int, max_pixels: int, verify: bool, skipped: List[Skip]) -> bool:
    where = item.path if item.offset < 0 else f"{item.path}/{item.name}"
    if item.offset < 0 and not os.access(item.path, os.R_OK):
        skipped.append(Skip(where, "unreadable", "no read permission; chmod +r it"))
        return False
    try:
        data = item.read_bytes() if item.offset >= 0 else item.path
        if (item.nbytes if item.offset >= 0 else os.path.getsize(item.path)) == 0:
            raise BadImage("zero_bytes", "0 bytes")
        img = open_checked(data, item.name, max_pixels, min_size)
        if verify:
            to_rgb(img)
        return True
    except BadImage as e:
        skipped.append(Skip(where, e.reason, e.detail))
    except PermissionError as e:
        skipped.append(Skip(where, "unreadable", e.strerror or "permission denied"))
    return False


def _conditioning(items: List[Item], labels: str, skipped: List[Skip]) -> List[Item]:
    """Captions if any example has one (the others get ""), else class folders, else nothing."""
    if any(it.caption is not None for it in items):
        items = [it if it.caption is not None else replace(it, caption="") for it in items]
        if labels != "folders":
            return items
    # The first folder of the relative path names the class (webdataset members have none).
    folders = [it.id.split("/")[0] if "/" in it.id and it.offset < 0 else None for it in items]
    if labels == "none" or (labels == "auto" and (None in folders or len(set(folders)) < 2)):
        return items
    out = []
    for it, folder in zip(items, folders):
        if folder is None:
            skipped.append(Skip(it.path, "no_class_folder", "put it in a sub-folder named after its class"))
        else:
            out.append(replace(it, class_name=folder))
    names = sorted({it.class_name for it in out})
    return [replace(it, label=names.index(it.class_name)) for it in out]


# ---- reporting -----------------------------------------------------------------------------


def class_names(items: List[Item]) -> Optional[List[str]]:
    """Class names indexed by `Item.label`, or None when the data has no class labels."""
    names = sorted({it.class_name for it in items if it.class_name is not None})
    return names or None


def summary(skipped: List[Skip]) -> str:
    counts = Counter(s.reason for s in skipped)
    return f"skipped {len(skipped)} file(s)" + (": " + ", ".join(f"{n} {r}" for r, n in counts.most_common())
                                                 if skipped else "")


def write_skipped(path: str, skipped: List[Skip]) -> None:
    """One JSON object per line: {"path": ..., "reason": ..., "detail": ...}."""
    io.write_text(path, "".join(s.to_json() + "\n" for s in skipped))
