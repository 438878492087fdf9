"""Readers: captioned image sources -> one flat index, and prompt lists for evaluation.

An index is a table of (source_id, caption, path) in a deterministic order (annotation
order, files sorted by name), so shard k always holds the same records and encoding can
resume. Reading an index touches only annotation files; images are opened later by the
encoder, where a missing or broken file is counted and skipped.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmm_ray.data import fs as fsu
from dmm_ray.data.config import SourceConfig

INDEX_COLUMNS = ["source_id", "caption", "path"]
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "manifest.parquet")

# Skip reasons found while reading annotations (before any image is opened).
BAD_ANNOTATION = "bad_annotation"  # a JSONL line that is not a JSON object, or text in it that is not UTF-8
NO_IMAGE_FIELD = "no_image_field"  # record without the image path field
EMPTY_CAPTION = "empty_caption"  # none of caption_fields holds a non-empty string
DUPLICATE_ID = "duplicate_id"  # source ids key the per-sample noise, so they must be unique
ABSOLUTE_PATH = "absolute_path"  # an image path starting with '/': the paths are relative to source.root

# What to do about a skip reason whose count alone does not say it (printed after the counts).
SKIP_HINTS = {
    ABSOLUTE_PATH: "the annotations name images by absolute paths, but image paths are read relative to source.root "
    "(JourneyDB's ./000/abc.jpg): write them relative to their common folder and set source.root to that folder",
}


def skip_hints(skipped) -> str:
    """'; <reason>: <what to do>' for each reason of `skipped` (reason -> count) that has a hint, else ''."""
    return "".join(f"; {reason}: {hint}" for reason, hint in SKIP_HINTS.items() if skipped.get(reason))


@dataclass
class ImageIndex:
    """`records`: DataFrame[source_id, caption, path] (path inside `filesystem`); `skipped`: reason -> count."""

    records: pd.DataFrame
    filesystem: pafs.FileSystem
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.records)


def read_image_index(source: SourceConfig) -> ImageIndex:
    """Index a JourneyDB-layout or image-folder source (see SourceConfig)."""
    fs, root = fsu.resolve(source.root)
    if not fsu.is_dir(fs, root):
        raise FileNotFoundError(f"source.root {source.root!r} is not a folder")
    if source.kind == "journeydb":
        files = _journeydb_annotation_files(fs, root, source)
        records = (rec for afs, f in files for rec in _iter_jsonl(afs, f))
    else:
        records = _iter_manifest(fs, _manifest_path(fs, root, source))
    return _build_index(records, fs, root, source)


def _journeydb_annotation_files(fs: pafs.FileSystem, root: str, source: SourceConfig) -> list[tuple[pafs.FileSystem, str]]:
    """(filesystem, path) of every annotation file; a folder contributes its *.jsonl sorted by name."""
    specs = [(s, *fsu.resolve(s)) for s in source.annotations] or [(source.root, fs, root)]
    files: list[tuple[pafs.FileSystem, str]] = []
    for spec, afs, path in specs:
        if fsu.is_dir(afs, path):
            found = fsu.list_files(afs, path, (".jsonl",))
            if not found:
                # unset, source.annotations is source.root: the message named a setting the user never gave
                if source.annotations:
                    where = f"source.annotations: no *.jsonl files in folder {spec!r}"
                else:
                    where = f"no *.jsonl annotation files in source.root {spec!r} (source.annotations is unset: every *.jsonl in root)"
                raise FileNotFoundError(f"{where}; give source.annotations (--annotations): JourneyDB's JSONL files or folders of them")
            files += [(afs, f) for f in found]
        elif fsu.exists(afs, path):
            files.append((afs, path))
        else:
            raise FileNotFoundError(f"source.annotations: {spec!r} does not exist")
    return files


def _manifest_path(fs: pafs.FileSystem, root: str, source: SourceConfig) -> str:
    if source.manifest:
        path = fsu.join(root, source.manifest)
        if not fsu.exists(fs, path):
            raise FileNotFoundError(f"source.manifest {source.manifest!r} not found in {source.root!r}")
        return path
    for name in MANIFEST_NAMES:
        if fsu.exists(fs, fsu.join(root, name)):
            return fsu.join(root, name)
    raise FileNotFoundError(f"no manifest in {source.root!r}: expected one of {', '.join(MANIFEST_NAMES)} (or set source.manifest)")


def _text(raw, newline: str | None = None) -> io.TextIOWrapper:
    """A text file that reads past a byte that is not UTF-8 (it becomes a lone surrogate, found by
    `_valid`: that line or row is skipped, not the job) and drops a BOM (Excel's "CSV UTF-8")."""
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _valid(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _iter_jsonl(fs: pafs.FileSystem, path: str) -> Iterator[Any]:
    """Yield parsed records; a malformed line (or one that is not UTF-8) yields None (counted as bad_annotation, not fatal)."""
    with fs.open_input_stream(path) as raw:
        for line in _text(raw):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line) if _valid(line) else None
            except json.JSONDecodeError:
                yield None


def _iter_manifest(fs: pafs.FileSystem, path: str) -> Iterator[Any]:
    if path.endswith(".jsonl"):
        yield from _iter_jsonl(fs, path)
    elif path.endswith(".csv"):
        with fs.open_input_stream(path) as raw:
            for row in csv.DictReader(_text(raw, newline="")):
                yield row if all(_valid(str(v)) for v in row.values() if v is not None) else None
    elif path.endswith(".parquet"):
        yield from pq.read_table(path, filesystem=fs).to_pylist()
    else:
        raise ValueError(f"manifest {path!r}: unsupported format, use .jsonl, .csv or .parquet")


def _lookup(record: dict, dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def caption_of(record: dict, caption_fields: list[str]) -> str:
    """First non-empty string among `caption_fields` (a list value contributes its first string)."""
    for name in caption_fields:
        value = _lookup(record, name)
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _build_index(records, fs: pafs.FileSystem, root: str, source: SourceConfig) -> ImageIndex:
    image_field = source.resolved_image_field()
    skipped: Counter = Counter()
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for record in records:
        if source.limit is not None and len(rows) + sum(skipped.values()) >= source.limit:
            break
        if not isinstance(record, dict):
            skipped[BAD_ANNOTATION] += 1
            continue
        rel = record.get(image_field)
        if not isinstance(rel, str) or not rel.strip():
            skipped[NO_IMAGE_FIELD] += 1
            continue
        rel = rel.strip()
        while rel.startswith("./"):  # JourneyDB writes img_path as "./000/abc.jpg"
            rel = rel[2:]
        if rel.startswith("/"):
            # joined under the root (the contract: SourceConfig, README), it named a file that is not there, and every
            # record was counted missing_file with no word of why: an index-time reason, with a hint (skip_hints)
            skipped[ABSOLUTE_PATH] += 1
            continue
        caption = caption_of(record, source.caption_fields)
        if not caption:
            skipped[EMPTY_CAPTION] += 1
            continue
        source_id = _source_id(record, rel, source.id_field)
        if not all(_valid(text) for text in (rel, caption, source_id)):
            # a JSON escape of half a surrogate pair ("\ud83d": an emoji cut by a length limit) decodes to
            # a str no UTF-8 writer takes: the index itself (pyarrow strings) failed on it, stopping the encode
            skipped[BAD_ANNOTATION] += 1
            continue
        if source_id in seen:
            skipped[DUPLICATE_ID] += 1
            continue
        seen.add(source_id)
        path = rel if "://" in rel else fsu.join(root, rel)
        rows.append((source_id, caption, path))
    return ImageIndex(pd.DataFrame(rows, columns=INDEX_COLUMNS), fs, skipped)


def _source_id(record: dict, rel: str, id_field: Optional[str]) -> str:
    """The record's id, else its image path. A blank id (an empty CSV cell) is no id: as one id shared by
    every blank record it dropped all but the first as duplicate_id."""
    value = _lookup(record, id_field) if id_field else record.get("id")
    return str(value) if value is not None and str(value) != "" else rel


def check_synthesis_prompts(cfg) -> None:
    """cfg.synthesis.prompts (a MergeConfig's), when set, is there and holds prompts: a ValueError or
    FileNotFoundError naming the key, for the checks before Ray of the stages that sample with them
    (the merge's synthesis, the few-step stage's samples of the merged model), which read it only later."""
    if not cfg.synthesis.prompts:  # the latent shards' captions: their own checks
        return
    try:
        read_prompts(cfg.synthesis.prompts)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(
            f"synthesis.prompts: {error}; give a text file with one prompt per line or a COCO captions JSON, "
            "or unset synthesis.prompts to sample the latent shards' captions"
        ) from None


def read_prompts(path: str, limit: Optional[int] = None) -> list[str]:
    """Evaluation prompts from an MS-COCO captions JSON (`annotations[].caption`) or a text file
    with one prompt per line. Blank lines / captions are dropped; order is kept."""
    fs, p = fsu.resolve(path)
    if not fsu.exists(fs, p):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    try:  # -sig: Notepad's BOM stayed in the first prompt (3 more tokens) and failed a COCO JSON
        text = fsu.read_bytes(fs, p).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text ({e}); save it as UTF-8") from e
    if p.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file {path!r} is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
            raise ValueError(f"prompt file {path!r}: expected MS-COCO captions JSON with an 'annotations' list")
        prompts = [a["caption"].strip() for a in doc["annotations"] if isinstance(a, dict) and isinstance(a.get("caption"), str)]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return prompts[:limit] if limit else prompts
