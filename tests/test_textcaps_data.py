"""The textcaps trainer's data: generator, TextCaps/parquet loaders, dataset, stratified sampler."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tunewise.trainers.textcaps import data as tcdata
from tunewise.trainers.textcaps.data import (
    CLASSES,
    GROUP_NAMES,
    VOCAB_SIZE,
    StratifiedGroupSampler,
    TextCapsDataset,
    annotation_name,
    encode_texts,
    generate,
    load_split,
    load_splits,
    ocr_name,
    top_classes,
)

SMALL = {"n_train": 200, "n_val": 100, "n_test": 20, "seed": 0}
CAPTION_KEYS = {
    "image_id", "image_classes", "flickr_original_url", "flickr_300k_url", "image_width", "image_height",
    "set_name", "image_name", "image_path", "caption_id", "caption_str", "reference_strs",
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("textcaps_small")
    return root, generate(root, SMALL)


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- generator ----------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed_and_differs_for_another(tmp_path, small):
    root, _ = small
    again = tmp_path / "again"
    generate(again, SMALL)
    first, second = digest_tree(root), digest_tree(again)
    assert first == second  # every JSON byte and every PNG byte
    other = tmp_path / "other"
    generate(other, {**SMALL, "seed": 1})
    third = digest_tree(other)
    for split in tcdata.SPLITS:
        assert first[annotation_name(split)] != third[annotation_name(split)]
        assert first[ocr_name(split)] != third[ocr_name(split)]
    assert set(first) != set(third)  # image ids depend on the seed too


def test_generated_files_have_textcaps_and_rosetta_shapes(small):
    root, meta = small
    for split, n in (("train", 200), ("val", 100), ("test", 20)):
        doc = json.loads((root / annotation_name(split)).read_text())
        assert {"dataset_type", "dataset_name", "dataset_version", "data"} <= set(doc)
        assert doc["dataset_type"] == split and doc["dataset_name"] == "textcaps"
        entries = doc["data"]
        assert len(entries) == n * SMALL.get("captions_per_image", 2)
        by_image: dict[str, list[dict]] = {}
        for e in entries:
            assert CAPTION_KEYS <= set(e)
            assert e["image_classes"][0] in CLASSES and len(e["image_classes"]) >= 1
            assert isinstance(e["caption_str"], str) and e["caption_str"] in e["reference_strs"]
            assert e["image_path"] == f"{split}/{e['image_id']}.png" and len(e["image_id"]) == 16
            assert e["tunewise"]["group"] in GROUP_NAMES
            by_image.setdefault(e["image_id"], []).append(e)
        assert len(by_image) == n
        # a caption entry per reference string, all of an image's entries agree on the image
        for group in by_image.values():
            assert sorted(g["caption_str"] for g in group) == sorted(group[0]["reference_strs"])
            assert len({g["image_classes"][0] for g in group}) == 1
        first = entries[0]
        with Image.open(root / first["image_path"]) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"

        ocr = json.loads((root / ocr_name(split)).read_text())
        records = {r["image_id"]: r for r in ocr["data"]}
        assert set(records) == set(by_image)
        words = 0
        for r in records.values():
            assert r["ocr_tokens"] == [i["word"] for i in r["ocr_info"]]
            for info in r["ocr_info"]:
                box = info["bounding_box"]
                assert 0 <= box["top_left_x"] < 1 and 0 <= box["top_left_y"] < 1
                assert 0 < box["width"] <= 1 - box["top_left_x"] + 1e-6
                assert 0 < box["height"] <= 1 - box["top_left_y"] + 1e-6
                words += 1
        assert words > n  # a sign carries a class word and/or a brand most of the time
    assert meta["classes"] == list(CLASSES)
    assert json.loads((root / "meta.json").read_text()) == meta


def test_majority_frac_is_exact_in_train_and_absent_in_val(tmp_path):
    meta = generate(tmp_path, {"n_train": 200, "n_val": 300, "n_test": 0, "majority_frac": 0.8})
    for split in ("train", "val"):
        entries = json.loads((tmp_path / annotation_name(split)).read_text())["data"]
        images = {e["image_id"]: e for e in entries}.values()
        per_class = {c: [0, 0] for c in CLASSES}
        styles = set()
        for e in images:
            per_class[e["image_classes"][0]][e["tunewise"]["group"] == "majority"] += 1
            styles.add(e["tunewise"]["style"])
        shares = {c: maj / (maj + mino) for c, (mino, maj) in per_class.items()}
        if split == "train":
            # exactly round(0.8 * 20) of each class's 20 images carry the class's own style
            assert all(s == pytest.approx(0.8) for s in shares.values())
        else:
            # independent of the class: about 1 in 10 agree by chance
            assert 0.03 < meta["splits"]["val"]["majority_share"] < 0.2
            assert max(shares.values()) < 0.35
        assert len(styles) == 10
    assert meta["splits"]["train"]["group_counts"] == {"majority": 160, "minority": 40}


def test_generate_is_cached_by_fingerprint_and_rebuilds_on_change(tmp_path):
    cfg = {"n_train": 20, "n_val": 10, "n_test": 10}
    first = generate(tmp_path, cfg)
    ann = tmp_path / annotation_name("train")
    mtime = ann.stat().st_mtime_ns
    old_images = set((tmp_path / "train").iterdir())
    assert generate(tmp_path, cfg) == first and ann.stat().st_mtime_ns == mtime
    changed = generate(tmp_path, {**cfg, "seed": 5})
    assert changed["fingerprint"] != first["fingerprint"]
    assert ann.stat().st_mtime_ns != mtime
    # the old config's images are gone, not left beside the new ones
    assert not (old_images & set((tmp_path / "train").iterdir()))
    assert len(list((tmp_path / "train").iterdir())) == 20
    # a dataset without meta.json (a killed run) is rebuilt
    (tmp_path / "meta.json").unlink()
    assert generate(tmp_path, {**cfg, "seed": 5})["fingerprint"] == changed["fingerprint"]
    with pytest.raises(ValueError, match="unknown keys"):
        generate(tmp_path, {"n_trian": 10})


def test_each_modality_alone_is_partial_and_both_together_do_better(tmp_path):
    """Nearest centroid (standardised features) on a colour histogram of the raw pixels, on the OCR
    words, and on both (sum of the two distance matrices, each over its median)."""
    generate(tmp_path, {"n_train": 600, "n_val": 300, "n_test": 0, "majority_frac": None, "seed": 3})
    train, val = load_split(tmp_path, "train"), load_split(tmp_path, "val")

    def colours(r):
        q = r.images.long() // 64  # 4 levels per channel: 64 colour bins
        code = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).reshape(len(r), -1)
        return torch.nn.functional.one_hot(code, 64).sum(1).double().numpy() / code.shape[1]

    vocab = sorted({w for toks in train.ocr_tokens for w in toks})

    def words(r):
        m = np.zeros((len(r), len(vocab)))
        for i, toks in enumerate(r.ocr_tokens):
            for w in toks:
                if w in vocab:
                    m[i, vocab.index(w)] += 1
        return m

    def distances(f_train, f_val):
        mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
        f_train, f_val = (f_train - mu) / sd, (f_val - mu) / sd
        centroids = np.stack([f_train[train.labels == c].mean(0) for c in range(10)])
        d = ((f_val[:, None, :] - centroids[None]) ** 2).sum(-1)
        return d / np.median(d)

    d_pix, d_txt = distances(colours(train), colours(val)), distances(words(train), words(val))
    acc = {k: float((d.argmin(1) == val.labels).mean()) for k, d in
           {"pixels": d_pix, "text": d_txt, "both": d_pix + d_txt}.items()}
    assert acc["pixels"] > 0.2 and acc["text"] > 0.2, acc  # chance is 0.1
    assert acc["both"] > max(acc["pixels"], acc["text"]) + 0.08, acc


# --- loaders: a hand-written fixture in the real formats ----------------------------------------------


def png_bytes(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def caption(image_id, classes, path, text, caption_id):
    return {
        "image_id": image_id, "image_classes": classes, "flickr_original_url": "", "flickr_300k_url": "",
        "image_width": 40, "image_height": 30, "set_name": "train", "image_name": image_id,
        "image_path": path, "caption_id": caption_id, "caption_str": text, "reference_strs": [text],
    }


@pytest.fixture
def real_json(tmp_path) -> Path:
    """Real TextCaps layout: caption-level JSON, TextVQA image folders, Rosetta OCR."""
    entries = [
        caption("aaa", ["Bottle", "Drink"], "train/aaa.png", "a bottle of coke", 0),
        caption("aaa", ["Bottle", "Drink"], "train/aaa.png", "a coke bottle on a table", 1),
        caption("bbb", ["Book"], "train/bbb.png", "a book called dune", 2),
        caption("ccc", ["Bottle"], "train/ccc.png", "a bottle with no file", 3),
        caption("ddd", ["Tree"], "train/ddd.png", "a tree with a sign", 4),
        {"caption_id": 5, "caption_str": "no image id here", "image_classes": ["Bottle"]},
    ]
    (tmp_path / annotation_name("train")).write_text(json.dumps(
        {"dataset_type": "train", "dataset_name": "textcaps", "dataset_version": "0.1", "data": entries}
    ))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "aaa.png").write_bytes(png_bytes((255, 0, 0)))
    # TextVQA unzips into train_images/ although TextCaps says train/
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train_images" / "bbb.png").write_bytes(png_bytes((0, 0, 255)))
    box = {"top_left_x": 0.1, "top_left_y": 0.2, "width": 0.3, "height": 0.1}
    (tmp_path / ocr_name("train")).write_text(json.dumps({"data": [
        {"image_id": "aaa", "ocr_tokens": ["coca", "cola"], "ocr_info": [{"word": "coca", "bounding_box": box},
                                                                      {"word": "cola", "bounding_box": box}]},
        {"image_id": "ccc", "ocr_tokens": ["x"], "ocr_info": []},
    ]}))
    return tmp_path


def test_json_loader_reads_real_layout_and_counts_problems(real_json):
    cfg = {"num_classes": 2, "image_size": 16}
    assert top_classes(real_json, cfg) == ["Bottle", "Book"]  # Bottle 2 images; Book beats Tree by name
    rec = load_split(real_json, "train", cfg)
    assert rec.classes == ["Bottle", "Book"]
    assert rec.image_ids == ["aaa", "bbb"]
    assert rec.labels.tolist() == [0, 1]
    assert rec.images.dtype == torch.uint8 and tuple(rec.images.shape) == (2, 3, 16, 16)
    assert rec.images[0, 0].min() == 255 and rec.images[0, 2].max() == 0  # red, resized, not blank
    assert rec.images[1, 2].min() == 255 and rec.images[1, 0].max() == 0  # blue, from train_images/
    assert rec.captions[0] == ["a bottle of coke", "a coke bottle on a table"]  # caption entries merged
    assert rec.ocr_tokens == [["coca", "cola"], []]
    assert rec.groups == [None, None]
    s = rec.summary
    assert (s["n_entries"], s["n_images"], s["n_kept"]) == (6, 4, 2)
    assert (s["malformed"], s["missing_image"], s["unreadable_image"], s["dropped_class"]) == (1, 1, 0, 1)
    assert s["missing_ocr"] == 1 and s["examples"]["missing_ocr"] == ["bbb"]
    assert s["examples"]["missing_image"][0].endswith("ccc.png")


def test_json_loader_raises_naming_the_file_when_every_image_is_missing(real_json, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"TextCaps_0\.1_train\.json.*none of the 3 images"):
        load_split(real_json, "train", {"num_classes": 2, "image_root": tmp_path / "nowhere"})
    with pytest.raises(FileNotFoundError, match="TextCaps_0.1_val.json"):
        load_split(real_json, "val", {"num_classes": 2})


def test_parquet_loader_reads_one_row_per_image_with_bytes(tmp_path):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image_id": ["aaa", "bbb", "ccc", "eee", "fff", "ggg"],
        "image_classes": [["Bottle"], ["Book", "Text"], ["Bottle"], ["Bottle"], [], ["Book"]],
        "image": pa.array([
            {"bytes": png_bytes((0, 255, 0)), "path": "aaa.png"},
            {"bytes": png_bytes((0, 0, 255)), "path": "bbb.png"},
            {"bytes": None, "path": "ccc.png"},
            {"bytes": b"not a png at all", "path": "eee.png"},
            {"bytes": png_bytes((1, 2, 3)), "path": "fff.png"},
            {"bytes": None, "path": "ggg.png"},  # a path instead of bytes: read from image_root
        ], type=image),
        "caption_str": [["green bottle", "a bottle"], ["a book"], ["x"], ["y"], ["z"], ["w"]],
    })
    (tmp_path / "ggg.png").write_bytes(png_bytes((255, 255, 255)))
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    (tmp_path / ocr_name("train")).write_text(json.dumps({"data": [{"image_id": "bbb", "ocr_tokens": ["dune"]}]}))
    rec = load_split(tmp_path, "train", {"image_size": 8})
    assert rec.summary["format"] == "parquet"
    assert rec.classes == ["Bottle", "Book"]
    assert rec.image_ids == ["aaa", "bbb", "ggg"]
    assert rec.labels.tolist() == [0, 1, 1]
    assert rec.images[0, 1].min() == 255 and rec.images[0, 0].max() == 0
    assert rec.images[2].min() == 255
    assert rec.captions == [["green bottle", "a bottle"], ["a book"], ["w"]]
    assert rec.ocr_tokens == [[], ["dune"], []]
    s = rec.summary
    assert (s["n_entries"], s["n_images"], s["n_kept"]) == (6, 5, 3)
    assert (s["malformed"], s["missing_image"], s["unreadable_image"]) == (1, 1, 1)
    assert s["examples"]["unreadable_image"] == ["train-00000-of-00001.parquet[3]"]
    assert s["missing_ocr"] == 2


def test_generated_and_real_data_share_the_loader(small):
    root, meta = small
    both = load_splits(root, splits=("train", "val"))
    rec = both["val"]
    assert both["train"].classes == rec.classes and len(both["train"]) == 200
    # balanced classes tie on frequency: the top-k order falls back to the name
    assert rec.summary["format"] == "json" and rec.classes == sorted(meta["classes"])
    assert len(rec) == 100 and rec.summary["n_kept"] == 100
    assert all(rec.summary[k] == 0 for k in ("malformed", "missing_image", "unreadable_image", "missing_ocr"))
    assert set(rec.groups) <= set(GROUP_NAMES)
    assert tuple(rec.images.shape) == (100, 3, 64, 64)
    assert rec.images.float().std() > 10  # real pictures, not blanks


# --- dataset ----------------------------------------------------------------------------------------------


def test_dataset_expand_and_spurious_modes(small):
    root, _ = small
    rec = load_split(root, "train")
    groups = [{"name": "image", "modality": "visual"}, {"name": "ocr", "modality": "text"},
              {"name": "both", "modality": "combined"}]
    ds = TextCapsDataset(rec, groups, mode="expand", text_source="ocr", max_len=24)
    n = len(rec)
    assert len(ds) == 3 * n and ds.group_counts() == [n, n, n]
    image, text, label, group = ds[n + 7]  # the 8th image, seen through the second group
    assert image.dtype == torch.uint8 and torch.equal(image, rec.images[7])
    assert image.data_ptr() == rec.images[7].data_ptr()  # a view: images are stored once
    assert text.dtype == torch.int64 and text.shape == (24,) and int(text.max()) < VOCAB_SIZE
    assert label == int(rec.labels[7]) and group == 1
    assert torch.equal(text, encode_texts([" ".join(rec.ocr_tokens[7])], 24)[0])
    images, texts, labels, gs = ds.batch([0, n, 2 * n + 1])
    assert images.shape == (3, 3, 64, 64) and gs.tolist() == [0, 1, 2]
    assert labels.tolist() == [int(rec.labels[0]), int(rec.labels[0]), int(rec.labels[1])]

    spur = TextCapsDataset(rec, [{"name": "minority"}, {"name": "majority"}], mode="spurious", text_source="caption")
    assert len(spur) == n
    assert [spur.group_names[g] for g in spur.groups.tolist()] == rec.groups
    assert spur.group_counts() == [20, 180]  # majority_frac 0.9 of 200
    assert spur.texts[0, 0] != 0  # the caption is there
    with pytest.raises(ValueError, match="not among the configured groups"):
        TextCapsDataset(rec, [{"name": "majority"}], mode="spurious")
    with pytest.raises(ValueError, match="mode"):
        TextCapsDataset(rec, groups, mode="both")


def test_dataset_works_with_a_dataloader_and_the_sampler(small):
    root, _ = small
    rec = load_split(root, "val")
    ds = TextCapsDataset(rec, [{"name": "majority"}, {"name": "minority"}], mode="spurious")
    sampler = StratifiedGroupSampler(ds.groups, batch_size=32, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)  # the default collate
    seen = []
    for images, texts, labels, groups in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        assert texts.shape == (len(labels), 64) and groups.shape == labels.shape
        seen.append(len(labels))
    assert sum(seen) == len(ds) and len(seen) == len(sampler) == 4
    sampler.set_epoch(0)
    images, texts, labels, groups = next(iter(loader))
    direct = ds.batch(sampler.plan(0)[0])  # the batched gather gives the same batch
    assert all(torch.equal(a, b) for a, b in zip((images, texts, labels, groups), direct))


# --- stratified sampler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_per_group,batch_size", [((70, 25, 5), 16), ((600, 200, 100, 100), 50), ((9, 1), 3)])
def test_sampler_keeps_group_shares_in_every_batch(n_per_group, batch_size):
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(n_per_group)])
    groups = groups[np.random.default_rng(0).permutation(len(groups))]
    n = len(groups)
    sampler = StratifiedGroupSampler(groups, batch_size=batch_size, seed=3)
    for epoch in range(3):
        batches = sampler.plan(epoch)
        assert sorted(i for b in batches for i in b) == list(range(n))  # each sample once
        assert len(batches) == len(sampler)
        for b in batches:
            counts = np.bincount(groups[b], minlength=len(n_per_group))
            share = len(b) * np.asarray(n_per_group) / n
            assert np.all(np.abs(counts - share) <= 1.0 + 1e-9), (epoch, counts, share)
        full = [b for b in batches if len(b) == batch_size]
        assert len(full) == n // batch_size


def test_sampler_is_deterministic_per_epoch_and_reshuffles_between_epochs():
    groups = [0] * 30 + [1] * 10
    a, b = StratifiedGroupSampler(groups, 8, seed=1), StratifiedGroupSampler(groups, 8, seed=1)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    second = list(a)  # iterating advances the epoch
    assert second != first_a and sorted(sum(second, [])) == list(range(40))
    a.set_epoch(0)
    assert list(a) == first_a
    assert list(StratifiedGroupSampler(groups, 8, seed=2)) != first_a
    dropped = StratifiedGroupSampler(groups, 16, seed=1, drop_last=True)
    assert len(dropped) == 2 and all(len(x) == 16 for x in dropped)
    for batch in StratifiedGroupSampler(groups, 16, seed=1, drop_last=True).plan(0):
        assert np.bincount(np.asarray(groups)[batch]).tolist() == [12, 4]
