"""Tiny vision towers and a synthetic image dataset (coloured shapes) for the VLM tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220)}
SHAPES = ("square", "circle")
IMAGE_SIZE = 32
BACKGROUND = (235, 235, 235)


def build_tiny_clip(directory: Path, image_size: int = IMAGE_SIZE, patch_size: int = 8) -> Path:
    """A random 2-layer CLIP vision tower and its image processor, saved as a checkpoint."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )
    CLIPVisionModel(config).save_pretrained(str(directory))
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(directory))
    return directory


def draw(colour: str, shape: str, rng: random.Random, directory: Path, name: str) -> str:
    """A shape of `colour` at a random place and size on a plain background; returns the file name."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    size = rng.randint(16, 24)
    left, top = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    box = (left, top, left + size, top + size)
    pen = ImageDraw.Draw(image)
    (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
    image.save(directory / name)
    return name


def blank_image(directory: Path) -> Path:
    from PIL import Image

    path = directory / "blank.png"
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND).save(path)
    return path


def shape_rows(directory: Path, count: int, seed: int) -> list[dict]:
    """`count` images, colours and shapes balanced; rows `{image, colour, shape}`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    rows = []
    for index in range(count):
        colour, shape = kinds[index % len(kinds)]
        rows.append({"image": draw(colour, shape, rng, directory, f"{seed}_{index}.png"), "colour": colour, "shape": shape})
    return rows


def write_caption_data(path: Path, rows: list[dict]) -> Path:
    lines = [json.dumps({"image": r["image"], "caption": f"{r['colour']} {r['shape']}"}) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_llava_data(path: Path, rows: list[dict]) -> Path:
    """LLaVA JSON: one colour question per image, the `<image>` placeholder in the first turn."""
    records = [
        {
            "id": str(index),
            "image": row["image"],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": row["colour"]},
            ],
        }
        for index, row in enumerate(rows)
    ]
    path.write_text(json.dumps(records))
    return path
