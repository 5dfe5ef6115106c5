"""ShapeWorld is the ground truth every tiny-model claim rests on, so its labels, QA and determinism are checked."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.data_cli import add_cli
from uniflow.data.shapeworld import (
    COLOUR_BACKGROUND,
    COLOUR_RGB,
    COLOURS,
    IMAGE_SIZE,
    NUM_CLASSES,
    PATCH_COVERED,
    SHAPE_BACKGROUND,
    SHAPES,
    SIZE_WORDS,
    ShapeWorldDataset,
    ShapeWorldSample,
    class_label,
    class_name,
    patch_areas,
    patch_labels,
    render_sample,
    write_shapeworld,
)
from uniflow.errors import OutputError, UniFlowError

N = 2 * NUM_CLASSES * 5  # enough for every class several times, cheap to render


@pytest.fixture(scope="module")
def samples() -> list[ShapeWorldSample]:
    return [render_sample(0, "train", i) for i in range(N)]


def _digest(sample: ShapeWorldSample) -> str:
    return hashlib.sha1(sample.image.tobytes()).hexdigest()


def test_images_are_64x64_rgb(samples: list[ShapeWorldSample]) -> None:
    for s in samples[:20]:
        assert s.image.mode == "RGB" and s.image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_deterministic_from_seed_split_index() -> None:
    a, b = render_sample(3, "train", 17), render_sample(3, "train", 17)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.to_json() == b.to_json()
    others = [render_sample(3, "train", 18), render_sample(3, "heldout", 17), render_sample(4, "train", 17)]
    for o in others:
        assert o.image.tobytes() != a.image.tobytes()


def test_random_access_is_order_independent() -> None:
    ds = ShapeWorldDataset("train", num_samples=40, seed=1)
    forward = [ds[i]["image"] for i in range(0, 40, 3)]
    backward = [ds[i]["image"] for i in reversed(range(0, 40, 3))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x, y)
    assert torch.equal(ds[-1]["image"], ds[39]["image"])


def test_train_and_heldout_are_disjoint(samples: list[ShapeWorldSample]) -> None:
    train = {_digest(s) for s in samples}
    heldout = {_digest(render_sample(0, "heldout", i)) for i in range(N)}
    assert len(train) == N and len(heldout) == N
    assert not train & heldout


def test_labels_match_main_object(samples: list[ShapeWorldSample]) -> None:
    for s in samples:
        assert 0 <= s.label < NUM_CLASSES
        main = s.objects[0]
        assert (s.shape, s.colour) == (main.shape, main.colour)
        assert s.label == class_label(main.shape, main.colour)
        assert class_name(s.label) == f"{main.colour} {main.shape}" == s.class_name
        assert 1 <= s.count == len(s.objects) <= 3
        for o in s.objects[1:]:  # the main object is strictly larger, by size class and by area
            assert SIZE_WORDS.index(o.size) < SIZE_WORDS.index(main.size)
            assert o.size_px < main.size_px
        assert len({(o.shape, o.colour) for o in s.objects}) == s.count


def test_every_class_reachable_and_balanced(samples: list[ShapeWorldSample]) -> None:
    counts = Counter(s.label for s in samples)
    assert set(counts) == set(range(NUM_CLASSES))
    assert set(counts.values()) == {N // NUM_CLASSES}
    assert {o.shape for s in samples for o in s.objects} == set(SHAPES)
    assert {o.colour for s in samples for o in s.objects} == set(COLOURS)
    assert set(Counter(s.count for s in samples)) == {1, 2, 3}


def test_objects_are_visible_where_metadata_says(samples: list[ShapeWorldSample]) -> None:
    """Objects never overlap, so every object's centre pixel shows its own colour (the main one included)."""
    for s in samples:
        arr = np.asarray(s.image).astype(int)
        for o in s.objects:
            pixel = arr[int(o.y), int(o.x)]
            assert np.abs(pixel - np.array(COLOUR_RGB[o.colour])).max() <= 3, (s.index, o)
            col = ("left", "center", "right")[int(o.x * 3 / IMAGE_SIZE)]
            row = ("top", "middle", "bottom")[int(o.y * 3 / IMAGE_SIZE)]
            expected = f"{row} {col}".replace("middle center", "center").replace("middle ", "")
            assert o.position == expected.replace(" center", "")


def test_qa_answers_agree_with_metadata(samples: list[ShapeWorldSample]) -> None:
    yes_no = Counter()
    for s in samples:
        pairs = {(o.colour, o.shape): o for o in s.objects}
        kinds = [q["type"] for q in s.qa]
        assert kinds == ["shape", "colour", "count", "position", "yes/no"]
        for q in s.qa:
            question, answer = q["question"], q["answer"]
            assert answer == answer.lower().strip() and len(answer.split()) <= 2
            if q["type"] == "shape":
                assert answer == s.objects[0].shape
            elif q["type"] == "colour":
                m = re.fullmatch(r"What colour is the (.+)\?", question)
                assert m
                if m.group(1) == "largest object":
                    assert answer == s.colour
                else:
                    matches = [o for o in s.objects if o.shape == m.group(1)]
                    assert len(matches) == 1 and matches[0].colour == answer
            elif q["type"] == "count":
                assert answer == str(s.count)
            elif q["type"] == "position":
                m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
                assert m and pairs[(m.group(1), m.group(2))].position == answer
            else:
                m = re.fullmatch(r"Is there a (\w+) (\w+)\?", question)
                assert m and m.group(1) in COLOURS and m.group(2) in SHAPES
                assert answer == ("yes" if (m.group(1), m.group(2)) in pairs else "no")
                yes_no[answer] += 1
        assert s.caption[0].isupper() and s.caption.endswith("background.")
        for o in s.objects:
            assert f"{o.size} {o.colour} {o.shape}" in s.caption
    assert min(yes_no.values()) > 0.35 * sum(yes_no.values())


def test_dataset_items_and_transform() -> None:
    ds = ShapeWorldDataset("heldout", num_samples=5, seed=2)
    assert len(ds) == 5
    item = ds[4]
    assert item["index"] == 4 and item["label"] == ds.sample(4).label
    img = item["image"]
    assert img.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    ref = torch.from_numpy(np.asarray(ds.sample(4).image).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(img, ref)
    flipped = ShapeWorldDataset("heldout", num_samples=5, seed=2, transform=lambda im: im.transpose(0))[4]["image"]
    assert torch.equal(flipped, img.flip(-1))
    with pytest.raises(IndexError):
        ds[5]
    big = ShapeWorldDataset("train", num_samples=2, image_size=128)[1]["image"]
    assert big.shape == (3, 128, 128)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(UniFlowError, match="split"):
        render_sample(0, "test", 0)
    with pytest.raises(UniFlowError, match="label"):
        class_name(NUM_CLASSES)
    with pytest.raises(UniFlowError):
        ShapeWorldDataset("val")


def test_writer_layout_jsonl_and_llava(tmp_path: Path) -> None:
    out = write_shapeworld(tmp_path / "sw", num=12, seed=5, split="heldout", progress=False)
    records = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(records) == 12
    for i, r in enumerate(records):
        assert r["image"] == f"heldout/{r['class_name'].replace(' ', '_')}/{i:06d}.png"
        assert (out / r["image"]).is_file()
        assert r["label"] == class_label(r["shape"], r["colour"])
        assert {"caption", "qa", "objects", "count"} <= set(r)
    first = render_sample(5, "heldout", 0)
    with Image.open(out / records[0]["image"]) as im:
        assert im.mode == "RGB" and im.tobytes() == first.image.tobytes()
    llava = json.loads((out / "heldout_llava.json").read_text())
    assert len(llava) == 12 and len({r["id"] for r in llava}) == 12
    for r in llava:
        assert (out / r["image"]).is_file()
        conv = r["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in c["value"] for c in conv) == 1
    assert llava[0]["conversations"][1]["value"] == first.caption
    assert not list(out.rglob("*.tmp"))


def test_cli_writes_both_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["shapes", "--out", str(tmp_path), "--num", "3", "--split", "both", "--no-progress"])
    assert args.func(args) == 0
    for split in ("train", "heldout"):
        assert len((tmp_path / f"{split}.jsonl").read_text().splitlines()) == 3
        assert (tmp_path / f"{split}_llava.json").is_file()
    assert str(tmp_path) in capsys.readouterr().out


def test_writer_refuses_foreign_folder_and_regenerates_without_stale_files(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by"):
        write_shapeworld(foreign, num=2, split="train", progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = write_shapeworld(tmp_path / "sw", num=6, seed=1, split="train", progress=False)
    (out / "keep.txt").write_text("user file")
    with pytest.raises(OutputError, match="--overwrite"):
        write_shapeworld(out, num=2, seed=2, split="train", progress=False)
    write_shapeworld(out, num=2, seed=2, split="train", progress=False, overwrite=True)
    assert len(list((out / "train").rglob("*.png"))) == 2  # the 4 images of the first generation are gone
    assert len((out / "train.jsonl").read_text().splitlines()) == 2
    assert (out / "keep.txt").read_text() == "user file"
    write_shapeworld(out, num=1, split="heldout", progress=False)  # another split: no --overwrite needed
    assert len(list((out / "train").rglob("*.png"))) == 2


def test_generation_speed(capsys: pytest.CaptureFixture[str]) -> None:
    """Reported, not asserted: the data loader renders on the fly, so this bounds training throughput."""
    n = 300
    start = time.perf_counter()
    for i in range(n):
        render_sample(7, "train", i)
    rate = n / (time.perf_counter() - start)
    with capsys.disabled():
        print(f"\nShapeWorld generation: {rate:.0f} images/s (64x64, one core)")


# sha1 over the pixels of samples 0..39 of both splits at 64 and 32 px, as rendered before the masks existed (commit
# 8115088): the per-patch targets are an addition, every image of every trained model's data stays what it was.
_PIXELS_BEFORE_MASKS = "e91e8a0a7eeee183568cc56accfbaff8024b4daa"


def test_masks_leave_every_pixel_as_before() -> None:
    digests = []
    for with_masks in (False, True):
        h = hashlib.sha1()
        for size in (64, 32):
            for split in ("train", "heldout"):
                for i in range(40):
                    h.update(render_sample(0, split, i, size, with_masks=with_masks).image.tobytes())
        digests.append(h.hexdigest())
    assert digests == [_PIXELS_BEFORE_MASKS, _PIXELS_BEFORE_MASKS]
    assert render_sample(0, "train", 3).masks is None  # plain rendering keeps no masks


def test_object_map_is_what_each_pixel_shows() -> None:
    """Where the map names an object, the pixel is (mostly) that object's colour; elsewhere it is not a shape colour
    mixed in by more than half."""
    for i in range(60):
        s = render_sample(0, "train", i, with_masks=True)
        masks, omap = s.masks, s.object_map
        assert masks.shape == (s.count, IMAGE_SIZE, IMAGE_SIZE) and omap.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert masks.min() >= 0 and masks.sum(0).max() <= 1 + 1e-5
        arr = np.asarray(s.image).astype(float)
        for k, o in enumerate(s.objects):
            assert omap[int(o.y), int(o.x)] == k  # the centre pixel belongs to its object
            inside = masks[k] == 1.0  # fully covered pixels show exactly the object's colour
            assert inside.any() and np.abs(arr[inside] - COLOUR_RGB[o.colour]).max() <= 1
            assert np.array_equal(omap == k, masks[k] > 1 - masks.sum(0))
        assert (omap == -1).sum() > IMAGE_SIZE * IMAGE_SIZE // 3  # objects never fill the frame


@pytest.mark.parametrize("size,patch", [(64, 8), (32, 8), (64, 16)])
def test_patch_labels_match_the_exact_coverage(size: int, patch: int) -> None:
    covered_total = 0
    for i in range(40):
        s = render_sample(1, "heldout", i, size, with_masks=True)
        shapes, colours = patch_labels(s, patch)
        shape_area, colour_area = patch_areas(s, patch)
        grid = size // patch
        assert shapes.shape == colours.shape == (grid, grid) and shapes.dtype == np.int64
        assert shape_area.shape == (grid, grid, len(SHAPES) + 1)
        np.testing.assert_allclose(shape_area.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(colour_area.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(shapes == SHAPE_BACKGROUND, colours == COLOUR_BACKGROUND)  # one notion of "covered"
        for r in range(grid):
            for c in range(grid):
                block = s.masks[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].mean(axis=(1, 2))
                k = int(block.argmax())
                if block[k] >= PATCH_COVERED:
                    o = s.objects[k]
                    assert (shapes[r, c], colours[r, c]) == (SHAPES.index(o.shape), COLOURS.index(o.colour))
                    assert shape_area[r, c, shapes[r, c]] >= PATCH_COVERED
                    covered_total += 1
                else:
                    assert (shapes[r, c], colours[r, c]) == (SHAPE_BACKGROUND, COLOUR_BACKGROUND)
    assert covered_total > 0


def test_dataset_per_patch_targets() -> None:
    plain = ShapeWorldDataset("train", num_samples=4, seed=5)
    dense = plain.with_patch_labels(8)
    item, ref = dense[2], plain[2]
    assert torch.equal(item["image"], ref["image"]) and item["label"] == ref["label"]
    s = render_sample(5, "train", 2, with_masks=True)
    shapes, colours = patch_labels(s, 8)
    assert torch.equal(item["patch_shape"], torch.from_numpy(shapes.reshape(-1)))
    assert torch.equal(item["patch_colour"], torch.from_numpy(colours.reshape(-1)))
    assert item["patch_shape_area"].shape == (64, len(SHAPES) + 1)
    assert item["patch_colour_area"].dtype == torch.float32
    assert set(ref) == {"image", "label", "index"}  # plain items carry no targets
    with pytest.raises(UniFlowError, match="patch_size must be a positive divisor of image_size 64, got 7"):
        ShapeWorldDataset("train", 2, patch_size=7)
    with pytest.raises(UniFlowError, match="transform"):
        ShapeWorldDataset("train", 2, patch_size=8, transform=lambda im: im)
    with pytest.raises(UniFlowError, match="with_masks=True"):
        patch_labels(render_sample(0, "train", 0), 8)
    with pytest.raises(UniFlowError, match="positive divisor of the image size 64, got 5"):
        patch_labels(s, 5)
