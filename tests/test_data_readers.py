"""Readers and config: JourneyDB layout (local path and file:// URI), image folders with
JSONL / CSV / parquet manifests, prompt lists, and image preprocessing. No Ray needed."""

import io
import json

import numpy as np
import pytest
from data_fixtures import caption, make_folder, make_journeydb
from PIL import Image
from pydantic import ValidationError

from dmm_ray.data.config import DataConfig, SourceConfig
from dmm_ray.data.images import preprocess_image
from dmm_ray.data.readers import read_image_index, read_prompts


def test_journeydb_index_captions_paths_and_skips(tmp_path):
    make_journeydb(tmp_path, n=10)
    root = tmp_path / "data" / "train" / "imgs"
    idx = read_image_index(SourceConfig(kind="journeydb", root=str(root), annotations=[str(tmp_path / "data" / "train" / "train_anno.jsonl")]))
    # 10 records + 1 malformed line: the malformed line and the empty caption are counted, not fatal.
    assert idx.skipped == {"bad_annotation": 1, "empty_caption": 1}
    assert len(idx) == 9
    rec = idx.records.set_index("source_id")
    # img_path "./000/img0000.jpg" is relative to root; it is also the source id (JourneyDB has no id field).
    assert rec.loc["000/img0000.jpg", "path"] == str(root / "000" / "img0000.jpg")
    assert rec.loc["000/img0000.jpg", "caption"] == caption(0) + ", photo"  # prompt wins
    assert rec.loc["001/img0001.jpg", "caption"] == caption(1)  # empty prompt -> Task2.Caption
    # Missing / broken files are not detected here (no image is opened when indexing).
    assert "000/img0006.jpg" in rec.index and "001/img0003.jpg" in rec.index


def test_journeydb_file_uri_folder_of_annotations_caption_field_choice_and_limit(tmp_path):
    make_journeydb(tmp_path, n=6, bad_line=False)
    train = tmp_path / "data" / "train"
    src = SourceConfig(kind="journeydb", root=f"file://{train / 'imgs'}", annotations=[f"file://{train}"], caption_fields=["Task2.Caption"], limit=4)
    idx = read_image_index(src)
    assert list(idx.records["caption"]) == [caption(i) for i in range(4)]
    assert idx.filesystem.type_name == "local"


def test_journeydb_missing_annotations_is_a_clear_error(tmp_path):
    make_journeydb(tmp_path, n=2)
    with pytest.raises(FileNotFoundError, match="source.annotations.*nope.jsonl"):
        read_image_index(SourceConfig(kind="journeydb", root=str(tmp_path), annotations=[str(tmp_path / "nope.jsonl")]))


@pytest.mark.parametrize("manifest", ["jsonl", "csv", "parquet"])
def test_folder_manifests(tmp_path, manifest):
    make_folder(tmp_path, n=5, manifest=manifest)
    idx = read_image_index(SourceConfig(kind="folder", root=str(tmp_path)))
    assert list(idx.records["source_id"]) == [f"img-{i}" for i in range(5)]
    assert list(idx.records["caption"]) == [caption(i) for i in range(5)]
    assert idx.records["path"].iloc[2] == str(tmp_path / "images" / "002.png")
    assert not idx.skipped


def test_toy_zoo_image_set_layout(tmp_path):
    # zoo contract: DIR/images/manifest.jsonl with {"id", "file" (relative to DIR/images), "caption", ...ground truth}
    images = tmp_path / "zoo" / "images"
    make_folder(images, n=3)
    (images / "manifest.jsonl").write_text(
        "".join(
            json.dumps({"id": f"z{i}", "file": f"images/{i:03d}.png", "caption": caption(i), "style": None, "colour": "red"}) + "\n" for i in range(3)
        )
    )
    idx = read_image_index(SourceConfig(root=str(images)))
    assert list(idx.records["source_id"]) == ["z0", "z1", "z2"]
    assert all(p.startswith(str(images)) for p in idx.records["path"])


def test_folder_without_manifest_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl, manifest.csv, manifest.parquet"):
        read_image_index(SourceConfig(root=str(tmp_path)))


def test_prompts_from_coco_json_and_txt(tmp_path):
    coco = {
        "images": [{"id": 1}],
        "annotations": [
            {"image_id": 1, "id": 7, "caption": " A cat on a mat. "},
            {"image_id": 1, "id": 8, "caption": ""},
            {"image_id": 2, "id": 9, "caption": "Two dogs."},
        ],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    assert read_prompts(str(tmp_path / "captions_val2014.json")) == ["A cat on a mat.", "Two dogs."]
    (tmp_path / "prompts.txt").write_text("a red circle\n\n  a blue square  \nthird\n")
    assert read_prompts(str(tmp_path / "prompts.txt")) == ["a red circle", "a blue square", "third"]
    assert read_prompts(f"file://{tmp_path / 'prompts.txt'}", limit=2) == ["a red circle", "a blue square"]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        read_prompts(str(tmp_path / "bad.json"))


def test_config_forbids_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="batchsize"):
        DataConfig(base="/b", shards="/s", encode={"batchsize": 4})
    with pytest.raises(ValidationError, match="multiple of 8"):
        DataConfig(base="/b", shards="/s", encode={"resolution": 30})
    with pytest.raises(ValidationError, match="caption_dropout"):
        DataConfig(base="/b", shards="/s", stream={"caption_dropout": 1.5})
    with pytest.raises(ValidationError, match="data.vae and data.tokenizer"):
        DataConfig(shards="/s")
    cfg = DataConfig(base="s3://bucket/base", shards="/s")
    assert (cfg.vae_path(), cfg.tokenizer_path(), cfg.scheduler_path()) == (
        "s3://bucket/base/vae",
        "s3://bucket/base/tokenizer",
        "s3://bucket/base/scheduler",
    )


def test_preprocess_resizes_short_side_and_centre_crops():
    # 64x32 image: left half black, right half white -> resized to 32 short side = 64x32 -> centre crop 32x32
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, 16:48] = 255  # the centre 32 columns are white
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = preprocess_image(buf.getvalue(), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 2:-2].min() > 200  # only the white centre survives the crop
    with pytest.raises(Exception):
        preprocess_image(b"\x89PNG\r\n\x1a\n truncated", 16)


@pytest.mark.parametrize("manifest", ["jsonl", "csv"])
def test_a_line_that_is_not_utf8_is_skipped_and_a_bom_is_no_part_of_the_first_key(tmp_path, manifest):
    """One latin-1 line stopped the whole read (UnicodeDecodeError); Excel's "CSV UTF-8" BOM made the
    first column `\\ufefffile` (every row skipped as no_image_field)."""
    make_folder(tmp_path, n=3, manifest=manifest)
    path = tmp_path / f"manifest.{manifest}"
    lines = path.read_bytes().splitlines(keepends=True)
    bad = '{"id": "x", "file": "000.png", "caption": "caf\xe9"}\n' if manifest == "jsonl" else "x,000.png,caf\xe9\n"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(lines) + bad.encode("latin-1"))
    idx = read_image_index(SourceConfig(kind="folder", root=str(tmp_path)))
    assert list(idx.records["source_id"]) == [f"img-{i}" for i in range(3)] and idx.skipped == {"bad_annotation": 1}


def test_preprocess_rescales_16_bit_and_float_greyscale_and_crops_a_strip_without_a_huge_intermediate():
    """PIL's convert("RGB") clipped a 16-bit ramp to white and a 0..1 float image to black; a 1 x 2000
    strip was resized to 512 x 1,024,000 (GBs) before the crop."""
    ramp = np.linspace(0, 1, 64)[None, :].repeat(16, 0)  # (16, 64), 0..1 left to right
    want = preprocess_image(_png(Image.fromarray((ramp * 255).round().astype(np.uint8))), 16)
    for im in (Image.fromarray((ramp * 65535).round().astype(np.uint16)), Image.fromarray(ramp.astype(np.float32), "F")):
        buf = io.BytesIO()
        im.save(buf, format="TIFF" if im.mode == "F" else "PNG")
        got = preprocess_image(buf.getvalue(), 16)
        assert np.abs(got.astype(int) - want).max() <= 1, im.mode
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    strip = preprocess_image(_png(Image.fromarray(np.linspace(0, 255, 2000).astype(np.uint8)[None, :])), 512)
    assert strip.shape == (512, 512, 3) and 120 < strip.mean() < 135  # the middle of the ramp
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: far below the 1.5 GB it took


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_a_json_escaped_half_surrogate_pair_is_a_bad_annotation_not_a_crash(tmp_path):
    """`"\\ud83d"` (an emoji cut in half by a length limit, as ensure_ascii JSON writes it) decodes to a str
    that no UTF-8 writer takes: building the index raised UnicodeEncodeError and the encode stopped."""
    make_folder(tmp_path, n=3)
    path = tmp_path / "manifest.jsonl"
    path.write_text(path.read_text() + '{"id": "x", "file": "000.png", "caption": "a cat \\ud83d"}\n')
    idx = read_image_index(SourceConfig(kind="folder", root=str(tmp_path)))
    assert list(idx.records["source_id"]) == [f"img-{i}" for i in range(3)] and idx.skipped == {"bad_annotation": 1}


def test_a_blank_id_in_the_id_field_falls_back_to_the_image_path(tmp_path):
    """With id_field set, blank cells were one shared id "": every blank record but the first was dropped as duplicate_id."""
    make_folder(tmp_path, n=4, manifest="csv")
    path = tmp_path / "manifest.csv"
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join([lines[0].replace("id,", "uid,", 1)] + [("" if i else "u0") + line[line.index(",") :] for i, line in enumerate(lines[1:])]) + "\n"
    )
    idx = read_image_index(SourceConfig(kind="folder", root=str(tmp_path), id_field="uid"))
    assert list(idx.records["source_id"]) == ["u0", "images/001.png", "images/002.png", "images/003.png"] and not idx.skipped


def test_absolute_image_paths_are_an_absolute_path_skip_with_a_hint(tmp_path):
    """img_path values written as absolute paths (to images that exist) were joined under source.root, so
    every record was indexed and then counted missing_file with no word of why. The paths are relative to
    the root: an absolute one is skipped at index time as absolute_path, and the encode's error says what to do."""
    from dmm_ray.data.encode import EncodeReport, plan_encode

    make_journeydb(tmp_path, n=4, broken=None, missing=None, empty_caption=None, bad_line=False)
    root = tmp_path / "data" / "train" / "imgs"
    anno = tmp_path / "data" / "train" / "train_anno.jsonl"
    records = [json.loads(line) for line in anno.read_text().splitlines()]
    for record in records[:3]:
        record["img_path"] = str(root / record["img_path"])  # an existing image, by its absolute path
    anno.write_text("".join(json.dumps(r) + "\n" for r in records))
    source = SourceConfig(kind="journeydb", root=str(root), annotations=[str(anno)])
    idx = read_image_index(source)
    assert idx.skipped == {"absolute_path": 3} and list(idx.records["source_id"]) == ["001/img0003.jpg"]  # the relative one is kept
    report = EncodeReport(4, 1, 0, 1, 1, 1, idx.skipped)
    assert "Skipped: absolute_path=3; absolute_path: the annotations name images by absolute paths" in report.summary()
    anno.write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    (tmp_path / "base" / "vae").mkdir(parents=True)
    (tmp_path / "base" / "vae" / "config.json").write_text("{}")  # what plan_encode checks of a VAE before it reads the source
    cfg = DataConfig.model_validate({"base": str(tmp_path / "base"), "shards": str(tmp_path / "out"), "source": source.model_dump()})
    with pytest.raises(ValueError, match=r"no usable records \(skipped: \{'absolute_path': 3\}\); absolute_path: .* relative to source.root"):
        plan_encode(cfg)


def test_prompt_files_with_a_bom_read_like_without_and_other_encodings_are_named(tmp_path):
    """Notepad's UTF-8 BOM stayed in a .txt's first prompt ("\\ufeffa cat": three more CLIP tokens) and
    failed a COCO .json; a latin-1 file raised a UnicodeDecodeError that named no file."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "p.txt").write_bytes(bom + b"a cat\na dog\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_bytes(bom + json.dumps({"annotations": [{"caption": "a cat"}]}).encode())
    assert read_prompts(str(tmp_path / "p.json")) == ["a cat"]
    (tmp_path / "q.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"q\.txt' is not UTF-8 text"):
        read_prompts(str(tmp_path / "q.txt"))


def test_a_source_key_of_the_other_kind_is_refused_not_ignored(tmp_path):
    """kind: folder read its manifest whatever source.annotations named, kind: journeydb every *.jsonl in
    root whatever source.manifest named: the records of another file were encoded without a word."""
    with pytest.raises(ValueError, match="source.annotations is read only with kind: journeydb"):
        SourceConfig(kind="folder", root=str(tmp_path), annotations=[str(tmp_path / "other.jsonl")])
    with pytest.raises(ValueError, match=r"source.manifest is read only with kind: folder .*source.annotations: \[<source.root>/m.jsonl\]"):
        SourceConfig(kind="journeydb", root=str(tmp_path), manifest="m.jsonl")
    SourceConfig(kind="journeydb", root=str(tmp_path), annotations=[str(tmp_path / "a.jsonl")])
    SourceConfig(kind="folder", root=str(tmp_path), manifest="m.jsonl")
