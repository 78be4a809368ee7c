"""The embedded tiny CLIP of the `pez` trainer: synthetic captioned shapes, the open_clip model built
offline, its checkpoint round trip through load_clip, offline errors, and the retrieval metric."""
import json
import pickle

import numpy as np
import pytest
import torch

from tunewise.trainers.pez import clip as pclip
from tunewise.trainers.pez import shapes

SMALL = shapes.ShapesConfig(counts={"train": 96, "val": 24, "test": 8}, seed=3)


def test_generator_is_deterministic_per_seed():
    a_img, a_cap, _ = shapes.generate(SMALL, "val")
    b_img, b_cap, _ = shapes.generate(SMALL, "val")
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, c_cap, _ = shapes.generate(shapes.ShapesConfig(counts=SMALL.counts, seed=4), "val")
    assert not np.array_equal(a_img, c_img)
    assert a_img.dtype == np.uint8 and a_img.shape == (24, 64, 64, 3)


def test_captions_match_the_drawn_pixels():
    images, captions, scenes = shapes.generate(SMALL, "train")
    for img, caption, objs in zip(images, captions, scenes):
        for o in objs:
            assert o["colour"] in caption and o["size"] in caption and o["shape"] in caption
            pixels = img[shapes.shape_mask(o["shape"], o["cx"], o["cy"], o["r"], img.shape[0])]
            named = np.all(pixels == shapes.COLOURS[o["colour"]], axis=1).mean()
            assert named > 0.95, (caption, o)  # objects never overlap, so the shape is its colour
        if caption.startswith("a ") and len(objs) == 2:
            a, b = objs
            rel = caption.split(f"{a['shape']} ", 1)[1].split(" a ", 1)[0]
            assert {"above": a["cy"] < b["cy"], "below": a["cy"] > b["cy"],
                    "left of": a["cx"] < b["cx"], "right of": a["cx"] > b["cx"]}[rel], caption
        elif not caption.startswith("a "):
            assert caption.split()[0] == shapes.COUNT_WORDS[len(objs)]


def test_split_round_trip(tmp_path):
    meta = shapes.write_split(tmp_path, SMALL)
    images, ids, captions = shapes.load_split(tmp_path, "val")
    ref_images, ref_captions, _ = shapes.generate(SMALL, "val")
    assert np.array_equal(images, ref_images) and captions == ref_captions and ids[0] == "val-000000"
    assert meta["fingerprint"] == shapes.fingerprint(SMALL) != shapes.fingerprint(shapes.ShapesConfig())


def test_tiny_config_builds_offline_with_a_few_million_parameters(tmp_path):
    model = pclip.build_tiny_clip(tmp_path)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n <= 10e6
    tok = pclip.open_clip.get_tokenizer(pclip.TINY_CLIP_NAME)
    ids = tok(["a small red circle above a large blue square"])
    assert ids.shape == (1, pclip.TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    assert ids[0, 0] == 49406 and 49407 in ids[0]


def _encodings(model, images, captions):
    tok = pclip.open_clip.get_tokenizer(pclip.TINY_CLIP_NAME)
    with torch.no_grad():
        return model.encode_image(pclip.normalise_images(images, model)), model.encode_text(tok(captions))


def test_checkpoint_reloads_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = pclip.build_tiny_clip(tmp_path).eval()
    path = pclip.save_checkpoint(model, tmp_path / "ckpt", epoch=1)
    images, captions, _ = shapes.generate(SMALL, "test")
    loaded = pclip.load_clip(pclip.TINY_CLIP_NAME, None, path)
    assert not loaded.model.training
    for want, got in zip(_encodings(model, images, captions), _encodings(loaded.model, images, captions)):
        assert torch.equal(want, got)
    assert set(torch.load(path, weights_only=True)) == {"epoch", "name", "state_dict"}


def test_short_training_writes_a_checkpoint_whose_metrics_reproduce(tmp_path):
    shapes.write_split(tmp_path / "data", SMALL)
    metrics = pclip.train_tiny_clip(tmp_path / "data", tmp_path / "clip", epochs=1, batch_size=32,
                                    lr=1e-3, seed=0, threads=1, progress=False, max_steps=2)
    assert metrics["steps"] == 2
    assert json.loads((tmp_path / "clip" / "clip_metrics.json").read_text()) == metrics
    clip, tok, _ = pclip.load_clip(pclip.TINY_CLIP_NAME, checkpoint=tmp_path / "clip" / pclip.CHECKPOINT_NAME)
    images = np.concatenate([shapes.load_split(tmp_path / "data", s)[0] for s in ("val", "test")])
    captions = sum((shapes.load_split(tmp_path / "data", s)[2] for s in ("val", "test")), [])
    assert pclip.evaluate_retrieval(clip, tok, images, captions) == metrics["retrieval_val_test"]
    vocab = json.loads((tmp_path / "clip" / "clip_vocab.json").read_text())
    assert {49406, 49407} <= set(vocab) and 0 not in vocab


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="nowhere/open_clip_pytorch_model.bin"):
        pclip.load_clip("ViT-B-32", None, missing)


def test_pretrained_tag_that_would_download_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache: the tag is not on disk
    monkeypatch.setenv("HOME", str(tmp_path))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"open_clip_pytorch_model\.bin.*checkpoint: "):
        pclip.load_clip("ViT-B-32", "laion2b_s34b_b79k", None)
    with pytest.raises(ValueError, match="unknown"):
        pclip.load_clip("ViT-B-32", "no_such_tag", None)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True


def test_user_checkpoint_is_loaded_without_running_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        pclip.load_clip("ViT-B-32", None, path)
    assert not _Payload.ran


def test_retrieval_metrics_on_constructed_cases():
    feats = torch.randn(5, 8)
    perfect = pclip.retrieval_metrics(feats, feats, list(range(5)))
    assert perfect["image_to_caption_top1"] == perfect["text_to_image_top1"] == 1.0
    # images 2 and 3 look like each other's caption; image 4 shares caption 0 with image 0
    text = torch.eye(4)
    images = torch.eye(4)[[0, 1, 3, 2, 0]]
    m = pclip.retrieval_metrics(images, text, [0, 1, 2, 3, 0])
    assert m["image_to_caption_top1"] == pytest.approx(3 / 5)
    assert m["image_to_caption_top5"] == 1.0
    assert m["text_to_image_top1"] == pytest.approx(2 / 4)
