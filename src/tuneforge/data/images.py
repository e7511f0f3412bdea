"""Images in training data: reading them, placeholders in the text, and batches with pixels.

    inputs = ImageInputs("<image>", image_token_id, tokens_per_image=576, processor=processor)
    encoded = encode_image_row(row, spec, tokenizer, template, max_length, inputs)
    batch = ImageCollator(text_collator, inputs.processor)(features)   # the text batch + pixel_values

A row's images are checked when the data is built (they exist, lie under the image root and
decode), so a bad one is an error naming the row and the path before training starts. The
examples keep the paths; pixels are read and preprocessed by the vision model's image processor
batch by batch in the collator, so the tokenised cache stays small. Packed rows
(`tuneforge.data.packing`) carry their examples' paths in token order.

Each `<image>` placeholder is one token in the template's text and is expanded to
`tokens_per_image` copies in the ids, one per image feature, as transformers' LLaVA expects;
placeholder tokens are never trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DatasetSpec
from tuneforge.data.formats import Message, row_to_messages
from tuneforge.data.sources import Row, check_inside
from tuneforge.data.templates import IGNORE_INDEX, Template, encode_conversation
from tuneforge.data.tokenize import Encoded, Example, fit_length
from tuneforge.errors import ConfigError, DataError

VISION_FORMATS = ("llava", "caption")


@dataclass(frozen=True)
class ImageExample(Example):
    """An example with the images its placeholders stand for (resolved paths, in order)."""

    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageInputs:
    """What the data stage needs from a vision-language model.

    Attributes:
        image_token: Placeholder text (`<image>`), a special token of the tokenizer.
        image_token_id: Its id.
        tokens_per_image: Image features per image, so placeholder copies per image.
        processor: The vision model's image processor (resize, crop, normalise).
    """

    image_token: str
    image_token_id: int
    tokens_per_image: int
    processor: Any

    def fingerprint(self) -> str:
        """Everything here that changes tokenised examples, for the data cache key."""
        return f"{self.image_token}|{self.image_token_id}|{self.tokens_per_image}"


def load_image(path: str | Path) -> Any:
    """The image as RGB (PIL); grayscale, palette and RGBA files are converted."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def image_root(spec: DatasetSpec) -> Path:
    return Path(spec.image_root or spec.root or ".")


def _image_values(row: Row, spec: DatasetSpec) -> list[str]:
    field = spec.image_field
    if field not in row.fields:
        found = ", ".join(sorted(row.fields)) or "(none)"
        raise DataError(
            f"missing field '{field}' (image); the row has: {found}",
            where=row.origin,
            hint=f"set image_field in the dataset config ({spec.name})",
        )
    value = row.fields[field]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise DataError(
            f"field '{field}' (image) is {value!r:.60}, expected a path or a non-empty list of paths",
            where=row.origin,
        )
    return values


def resolve_row_images(row: Row, spec: DatasetSpec) -> list[str]:
    """The row's image files, resolved under the image root and checked to decode.

    Raises:
        DataError: A missing field, a path outside the root, a missing or undecodable file;
            the message names the row and the path.
    """
    root = image_root(spec)
    resolved = []
    for value in _image_values(row, spec):
        path = check_inside(root, root / value, where=row.origin)
        if not path.is_file():
            raise DataError(
                f"image '{value}' not found (looked for {path})",
                where=row.origin,
                hint=f"image paths are relative to the image root {root.resolve()} (image_root)",
            )
        try:
            load_image(path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for truncated or foreign files
            raise DataError(f"image '{value}' cannot be read: {exc}", where=row.origin) from None
        resolved.append(str(path))
    return resolved


def _with_placeholders(messages: list[Message], count: int, token: str, origin: str) -> list[Message]:
    """Messages whose placeholders match the image count; none at all puts them before the first user turn."""
    present = sum(m["content"].count(token) for m in messages)
    if present == 0:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = list(messages)
        messages[first] = {**messages[first], "content": "\n".join([token] * count + [messages[first]["content"]])}
        return messages
    if present != count:
        raise DataError(
            f"the text has {present} '{token}' placeholder(s) but the row has {count} image(s)",
            where=origin,
            hint="put one placeholder per image, or none (they are then put before the first user turn)",
        )
    return messages


def prompt_with_images(prompt: str, count: int, token: str) -> str:
    """A generation prompt with one placeholder per image (put first when it has none)."""
    return _with_placeholders([{"role": "user", "content": prompt}], count, token, "the prompt")[0]["content"]


def image_row_messages(row: Row, spec: DatasetSpec, image_token: str, image_count: int) -> list[Message]:
    """The conversation of a llava or caption row, one placeholder per image."""
    if spec.format == "caption":
        caption = row.fields.get(spec.caption_field)
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(
                f"field '{spec.caption_field}' (caption) is {caption!r:.60}, expected non-empty text",
                where=row.origin,
                hint=f"set caption_field in the dataset config ({spec.name})",
            )
        user = "\n".join([image_token] * image_count + ([spec.caption_prompt] if spec.caption_prompt else []))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": caption}]
        return [{"role": "system", "content": spec.system_prompt}, *messages] if spec.system_prompt else messages
    # LLaVA JSON: ShareGPT turns under `conversations` unless messages_field says otherwise.
    update = {"format": "chat"}
    if "messages_field" not in spec.model_fields_set:
        update["messages_field"] = "conversations"
    messages = row_to_messages(row, spec.model_copy(update=update))
    return _with_placeholders(messages, image_count, image_token, row.origin)


def expand_image_tokens(input_ids: list[int], labels: list[int], inputs: ImageInputs) -> tuple[list[int], list[int]]:
    """Each placeholder id becomes `tokens_per_image` copies; none of them is trained."""
    ids: list[int] = []
    masks: list[int] = []
    for token, label in zip(input_ids, labels):
        if token == inputs.image_token_id:
            ids += [token] * inputs.tokens_per_image
            masks += [IGNORE_INDEX] * inputs.tokens_per_image
        else:
            ids.append(token)
            masks.append(label)
    return ids, masks


def expand_prompt(prompt_ids: list[int], inputs: ImageInputs) -> list[int]:
    """Generation prompt ids with placeholders expanded as in training."""
    return expand_image_tokens(prompt_ids, prompt_ids, inputs)[0]


def encode_image_row(
    row: Row, spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int, inputs: ImageInputs
) -> Encoded:
    """Check the row's images, template and mask its conversation, expand the placeholders.

    A row too long for `max_length` is truncated only after its last image token (cutting
    into an image would leave features without positions); otherwise it is dropped.

    Raises:
        DataError: A bad image, a placeholder count that differs from the image count, or
            a conversation that does not fit the format.
        ConfigError: `on_too_long: split`, which would separate images from their text.
    """
    if spec.on_too_long == "split":
        raise ConfigError(
            "on_too_long: split would cut images apart from their text",
            where=f"{spec.name}.on_too_long",
            hint="use truncate or drop for llava and caption data",
        )
    images = resolve_row_images(row, spec)
    messages = image_row_messages(row, spec, inputs.image_token, len(images))
    input_ids, labels = encode_conversation(tokenizer, template, messages, train_on=spec.train_on, origin=row.origin)
    if input_ids.count(inputs.image_token_id) != len(images):
        raise DataError(
            f"the template turned {len(images)} '{inputs.image_token}' placeholder(s) into "
            f"{input_ids.count(inputs.image_token_id)} image token(s)",
            where=row.origin,
            hint="the template must keep message text as it is",
        )
    input_ids, labels = expand_image_tokens(input_ids, labels, inputs)
    fitted = fit_length(input_ids, labels, max_length, spec.on_too_long)
    examples = [
        ImageExample(e.input_ids, e.labels, tuple(images))
        for e in fitted.examples
        if e.input_ids.count(inputs.image_token_id) == len(images) * inputs.tokens_per_image
    ]
    return Encoded(examples, fitted.outcome if examples else "dropped")


def pixel_values(processor: Any, paths: Sequence[str]) -> Any:
    """The images at `paths` preprocessed into one tensor (images, channels, height, width)."""
    return processor(images=[load_image(path) for path in paths], return_tensors="pt")["pixel_values"]


class ImageCollator:
    """A text collator's batch plus `pixel_values` for the images of its rows.

    `text` pads examples (`DataCollatorForSeq2Seq`, padding masked by position) or flattens
    packed rows (`PackedCollator`); both keep the rows' tokens in order, and a row's `images`
    are in the order of its placeholders (a packed row's too), so the images stacked row by row
    are in the order in which the model fills image features into placeholder positions.
    """

    def __init__(self, text: Callable[[list[dict[str, Any]]], dict[str, Any]], processor: Any) -> None:
        self.text = text
        self.processor = processor

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        paths = [path for feature in features for path in feature.get("images") or []]
        batch = self.text([{k: v for k, v in feature.items() if k != "images"} for feature in features])
        if paths:
            batch["pixel_values"] = pixel_values(self.processor, paths)
        return batch


def collapse_image_tokens(input_ids: list[int], labels: list[int], inputs: ImageInputs) -> tuple[list[int], list[int], str]:
    """For `data preview`: each image's run of tokens shown as one placeholder, and the count.

    Returns the shortened ids and labels and e.g. `576 image tokens (1 image)`.
    """
    ids: list[int] = []
    masks: list[int] = []
    seen = 0  # image tokens so far; every `tokens_per_image`-th starts a new image
    for token, label in zip(input_ids, labels):
        if token == inputs.image_token_id:
            seen += 1
            if (seen - 1) % inputs.tokens_per_image:
                continue
        ids.append(token)
        masks.append(label)
    count = input_ids.count(inputs.image_token_id)
    images = count // inputs.tokens_per_image
    return ids, masks, f"{count} image tokens ({images} image{'s' if images != 1 else ''})"


__all__ = [
    "VISION_FORMATS",
    "ImageCollator",
    "ImageExample",
    "ImageInputs",
    "collapse_image_tokens",
    "encode_image_row",
    "expand_image_tokens",
    "expand_prompt",
    "image_row_messages",
    "load_image",
    "pixel_values",
    "prompt_with_images",
    "resolve_row_images",
]
