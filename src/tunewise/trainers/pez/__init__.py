"""The pez trainer (seed 000): PEZ hard-prompt discovery against an open_clip CLIP.

Names shared by the modules live here, so that `trainer.py` (imported by every job that resolves the trainer)
does not import open_clip, and through it torchvision, before a job needs the CLIP."""

TINY_CLIP_NAME = "tunewise-tiny-clip"  # the embedded CLIP's open_clip model name
CHECKPOINT_NAME = "tiny_clip.pt"
TINY_IMAGE_SIZE = 64  # the side of the images the tiny CLIP sees (its vision config and the prepared arrays)
