"""A user's folder of images as the pez tests write it: coloured shapes drawn by the shapes generator, saved as
PNG and JPEG files (some in a subfolder, at a size other than the CLIP's), with a captions file describing them,
so a tiny CLIP trained on them learns something in a few steps."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from tunewise.trainers.pez import shapes


def write_image_folder(root: Path, n: int = 24, captions: str | None = "captions.csv", seed: int = 7,
                       extra: dict[str, bytes] | None = None) -> dict[str, str]:
    """n images under root (every third in photos/, every fourth a JPEG), `captions` (csv, json or None) and
    `extra` files as given; returns {file: caption}."""
    cfg = shapes.ShapesConfig(image_size=48, counts={"train": n}, seed=seed)
    images, texts, _ = shapes.generate(cfg, "train")
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (image, text) in enumerate(zip(images, texts)):
        rel = f"{'photos/' if i % 3 == 0 else ''}img_{i:03d}.{'jpg' if i % 4 == 1 else 'png'}"
        (root / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(image).resize((72, 72), Image.Resampling.NEAREST).save(root / rel, quality=95)
        out[rel] = text
    if captions and captions.endswith(".csv"):
        pd.DataFrame({"file": list(out), "caption": list(out.values())}).to_csv(root / captions, index=False)
    elif captions:
        import json

        (root / captions).write_text(json.dumps(out), encoding="utf-8")
    for name, data in (extra or {}).items():
        (root / name).write_bytes(data)
    return out
