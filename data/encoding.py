"""Chat formatting and collation: (image, question[, response]) -> the tensors every model of the pipeline takes.

encode_example renders one conversation through the processor's chat template and marks the response tokens
(`response_mask`); collate pads a list of encoded examples into a batch and carries each family's image tensors
(and `has_image`: which rows have one); collate_pairs stacks the two sides of preference pairs so that a score
model scores them in one forward. check_images finds, at load time, the images a processor would refuse.

What encode_example does to the text, so that the ids are what the model family expects:
  * BOS: the template is tokenized without special tokens, then the tokenizer's BOS is put first when the
    tokenizer adds one (Llama / Vicuna / Mistral backbones of LLaVA) and the template did not already write it;
    never twice. Qwen defines none.
  * The response is tokenized on its own, without BOS, and EOS follows it. With a sentencepiece tokenizer it gets
    the leading "▁" of a new text: after LLaVA-1.5's "ASSISTANT:" that is the space of "ASSISTANT: answer", the
    format LLaVA was trained on. Byte-level BPE templates (Qwen, ChatML) end the prompt with "\\n", so prompt +
    response ids equal the ids of the joined text.
  * Control strings in user text (question and response): a literal image placeholder (<image>,
    <|image_pad|>, ...) or special token (<|im_end|>, <s>, ...) would become the real token: a placeholder count
    the processor rejects, or a prompt injection that ends the user turn. They are broken with a zero-width space
    after their first character (stats["neutralised_text"] counts the texts changed).
  * A text-only model given an image: the image is dropped (stats["dropped_image"], one notice on stderr).
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image

from data.sources import ImageRef, SkipCounter, image_size, open_image, row_error
from families import IMAGE_KEYS, QWEN_FAMILIES
from utils import get_tokenizer, notice_once

ZERO_WIDTH_SPACE = "\u200b"
MARKUP = set("<>[]|")  # a non-special added token is neutralised only if it looks like markup ("<tool_call>")


def chat_messages(question: str, has_image: bool, response: str | None = None, family: str = "llava") -> list:
    """The conversation: user content = [image, text question]; assistant content = the response text."""
    if family == "text":
        messages = [{"role": "user", "content": question}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return messages
    user = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


# ---- What the tokenizer does on its own: BOS, control strings ---------------------------------------------


@functools.lru_cache(maxsize=16)
def bos_to_add(processor) -> int | None:
    """The BOS id every sequence of this model starts with, if tokenizing adds one (the tokenizer defines a BOS
    and `tokenizer("x")` puts it first); None otherwise (Qwen: no BOS; templates that write it themselves still
    get it exactly once, see _encode_prompt)."""
    tokenizer = get_tokenizer(processor)
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


@functools.lru_cache(maxsize=16)
def control_strings(processor) -> tuple[str, ...]:
    """Strings that tokenize to a control token, longest first: the processor's placeholders (image_token,
    video_token, ...), the tokenizer's special tokens, and its other added tokens that look like markup."""
    tokenizer = get_tokenizer(processor)
    found = {value for name, value in vars(processor).items() if name.endswith("_token") and isinstance(value, str)}
    found |= set(tokenizer.all_special_tokens)
    for token in tokenizer.added_tokens_decoder.values():
        if token.special or MARKUP & set(token.content):
            found.add(token.content)
    return tuple(sorted((s for s in found if len(s.strip()) >= 2), key=lambda s: (-len(s), s)))


def neutralise(text: str, strings: tuple[str, ...]) -> str:
    """`text` with every control string broken by a zero-width space after its first character, so that it
    tokenizes as plain characters ("<image>" -> "<\\u200bimage>"). Repeated until none is left (breaking one
    string can reveal another, as in "<<image>image>")."""
    for _ in range(8):
        present = [s for s in strings if s in text]
        if not present:
            return text
        for s in present:
            text = text.replace(s, s[0] + ZERO_WIDTH_SPACE + s[1:])
    return text


# ---- One example -------------------------------------------------------------------------------------------


def _prepend(enc: dict, bos: int) -> dict:
    """Put `bos` first in the token-aligned tensors of a (1, L) encoding (mask 1, token types 0)."""
    fill = {"input_ids": bos, "attention_mask": 1}
    length = enc["input_ids"].shape[1]
    for key, value in enc.items():
        if key not in IMAGE_KEYS and isinstance(value, torch.Tensor) and tuple(value.shape) == (1, length):
            enc[key] = torch.cat([value.new_full((1, 1), fill.get(key, 0)), value], dim=1)
    return enc


def _encode_prompt(processor, family: str, question: str, image, source: str | None = None) -> dict:
    """The prompt (user turn + generation prompt) as the model family expects it: template text tokenized without
    special tokens, image placeholders expanded by the processor, then the tokenizer's BOS first (exactly once)."""
    prompt_text = processor.apply_chat_template(
        chat_messages(question, image is not None, family=family), add_generation_prompt=True, tokenize=False
    )
    if image is not None:
        try:
            enc = dict(processor(images=[image], text=[prompt_text], return_tensors="pt", add_special_tokens=False))
        except ValueError as e:  # e.g. Qwen: aspect ratio > 200; named by row, not a stack trace mid-epoch
            raise row_error(source, "image", f"the processor refused the image ({e})", "bad_image") from e
    else:
        enc = dict(get_tokenizer(processor)([prompt_text], return_tensors="pt", add_special_tokens=False))
    bos = bos_to_add(processor)
    if bos is not None and enc["input_ids"][0, 0].item() != bos:
        enc = _prepend(enc, bos)
    return enc


def encode_example(
    processor,
    family: str,
    question: str,
    image: Image.Image | ImageRef | None = None,
    response: str | None = None,
    max_length: int | None = None,
    stats: Counter | None = None,
    add_eos: bool = True,
    source: str | None = None,
) -> dict:
    """Model inputs for one (image or none, question, response or none) through the processor's chat template.

    `image` is a PIL image or a row's ImageRef (decoded here, so rows never hold pixels); `source` (the row's
    "file:row") names the row in a DataError if the image cannot be read or the processor refuses it.
    Prompt-only (response=None): the user turn with the generation prompt appended, for rollouts.
    Prompt + response: response tokens (tokenised on their own, then EOS) follow the prompt, and `response_mask`
    marks exactly them, so the SFT loss, the score and every PPO mean see the response and nothing else.
    BOS, control strings in user text, images given to a text model: see the module docstring.
    Too long: the question is truncated from the left (its end, usually the actual ask, is kept) and
    stats["truncated_question"] is counted; if the response alone does not fit it is cut on the right
    (stats["truncated_response"], and then there is no EOS).
    """
    tokenizer = get_tokenizer(processor)
    stats = stats if stats is not None else Counter()
    if image is not None and family == "text":
        stats["dropped_image"] += 1
        notice_once("a text-only model was given rows with images; the images are dropped (counted as "
                    "dropped_image)")
        image = None
    image = open_image(image, source)
    strings = control_strings(processor)
    safe_question = neutralise(question, strings)
    safe_response = None if response is None else neutralise(response, strings)
    changed = (safe_question != question) + (safe_response != response)
    if changed:
        stats["neutralised_text"] += changed
    question, response = safe_question, safe_response
    response_ids = []
    if response is not None:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])
    enc = _encode_prompt(processor, family, question, image, source)
    if max_length is not None and enc["input_ids"].shape[1] + len(response_ids) > max_length:
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        overhead = enc["input_ids"].shape[1] - len(question_ids)  # template + image tokens (+ BOS)
        if overhead + len(response_ids) > max_length - 1 and response is not None:
            keep = max(1, max_length - overhead - 1)
            response_ids = response_ids[:keep]
            stats["truncated_response"] += 1
        budget = max_length - len(response_ids)
        for _ in range(8):  # decode/encode is not exactly invertible; shrink until it fits
            if enc["input_ids"].shape[1] <= budget:
                break
            over = enc["input_ids"].shape[1] - budget
            question_ids = question_ids[over:]
            question = neutralise(tokenizer.decode(question_ids, skip_special_tokens=True), strings)
            enc = _encode_prompt(processor, family, question, image, source)
        if enc["input_ids"].shape[1] > budget:
            raise ValueError(f"cannot fit the prompt into max_length={max_length}: the template and image need "
                             f"{overhead} tokens; raise --max_length")
        stats["truncated_question"] += 1
    prompt_ids = enc["input_ids"][0]
    n_prompt, n_response = prompt_ids.shape[0], len(response_ids)
    example = {
        "input_ids": torch.cat([prompt_ids, torch.tensor(response_ids, dtype=torch.long)]),
        "attention_mask": torch.ones(n_prompt + n_response, dtype=torch.long),
        "response_mask": torch.cat([torch.zeros(n_prompt, dtype=torch.bool), torch.ones(n_response, dtype=torch.bool)]),
    }
    if "mm_token_type_ids" in enc:  # Qwen: 0 (text) over the response too
        example["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"][0], torch.zeros(n_response, dtype=torch.long)])
    for key in IMAGE_KEYS:
        if key in enc:
            example[key] = enc[key]
    return example


# ---- Load-time image checks ---------------------------------------------------------------------------------


def image_problem(size: tuple[int, int], processor, family: str) -> str | None:
    """Why the processor would refuse an image of this (width, height), or None; judged from the size alone.
    Qwen2(.5)-VL: transformers' smart_resize with the processor's patch, merge and pixel limits (it raises for an
    aspect ratio above 200). LLaVA / LLaVA-NeXT resize any image."""
    if family not in QWEN_FAMILIES:
        return None
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = processor.image_processor
    width, height = size
    if min(width, height) < 1:
        return f"image has size {width}x{height}"
    min_pixels, max_pixels = getattr(ip.size, "shortest_edge", None), getattr(ip.size, "longest_edge", None)
    if not min_pixels or not max_pixels:
        return None  # a processor configured some other way: it will say so itself, naming the row (bad_image)
    try:
        smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        return f"{width}x{height} image refused by the processor ({e})"
    return None


def check_images(rows: list[dict], processor, family: str, skip_invalid: bool = False,
                 skips: SkipCounter | None = None) -> list[dict]:
    """The rows whose image the processor accepts, judged at load time from the size stored at validation (no
    decoding). A refused image is a DataError naming the row (reason "bad_image"), or under skip_invalid the row
    is skipped and counted in `skips`; so a run stops, or skips, before training rather than mid-epoch."""
    kept = []
    for row in rows:
        size = image_size(row.get("image")) if family != "text" else None
        problem = image_problem(size, processor, family) if size is not None else None
        if problem is None:
            kept.append(row)
            continue
        error = row_error(row.get("source"), "image", problem, "bad_image")
        if not skip_invalid:
            raise error
        if skips is not None:
            skips.add(error)
    return kept


# ---- Batches ----------------------------------------------------------------------------------------------


def _pad(sequences: list[torch.Tensor], value, side: str) -> torch.Tensor:
    length = max(s.shape[0] for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
    for i, s in enumerate(sequences):
        if side == "left":
            out[i, length - s.shape[0]:] = s
        else:
            out[i, : s.shape[0]] = s
    return out


def collate(examples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad encoded examples into a batch and carry each family's image tensors, for the rows that have an image,
    in row order: `pixel_values` (LLaVA: one per image; LLaVA-NeXT: patches padded to the batch maximum,
    `image_sizes` says which are real; Qwen: patches concatenated, `image_grid_thw` gives each image's t*h*w patch
    count) and Qwen's `mm_token_type_ids`. `has_image` (B,) bool says which rows have an image: the k-th True row
    owns the k-th image. Labels are -100 outside the response."""
    batch = {
        "input_ids": _pad([e["input_ids"] for e in examples], pad_token_id, padding_side),
        "attention_mask": _pad([e["attention_mask"] for e in examples], 0, padding_side),
        "response_mask": _pad([e["response_mask"] for e in examples], False, padding_side),
        "has_image": torch.tensor([("pixel_values" in e) for e in examples], dtype=torch.bool),
    }
    batch["labels"] = batch["input_ids"].masked_fill(~batch["response_mask"], -100)
    if any("mm_token_type_ids" in e for e in examples):
        batch["mm_token_type_ids"] = _pad(
            [e.get("mm_token_type_ids", torch.zeros_like(e["input_ids"])) for e in examples], 0, padding_side
        )
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        pixel_values = [e["pixel_values"] for e in with_images]
        if "image_sizes" in with_images[0] and pixel_values[0].dim() == 5:  # LLaVA-NeXT: (1, patches, 3, h, w)
            n = max(p.shape[1] for p in pixel_values)
            pixel_values = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, n - p.shape[1])) for p in pixel_values]
        batch["pixel_values"] = torch.cat(pixel_values)
        for key in ("image_sizes", "image_grid_thw"):
            if key in with_images[0]:
                batch[key] = torch.cat([e[key] for e in with_images])
    return batch


def collate_pairs(first: list[dict], second: list[dict], pad_token_id: int) -> dict:
    """A preference batch: rows 0..B-1 are the `first` responses (chosen / higher-cost), rows B..2B-1 the `second`
    ones, so a score model scores a whole batch of pairs in one forward."""
    return collate(first + second, pad_token_id, "right")


def select_rows(batch: dict, rows: list[int]) -> dict:
    """Rows `rows` of a collated batch with exactly their images: the k-th True of `has_image` owns image k
    (LLaVA / LLaVA-NeXT: entry k of pixel_values and image_sizes; Qwen: image k's t*h*w patches of pixel_values
    and row k of image_grid_thw). Non-tensor entries (lists) are indexed too. A batch without `has_image` has an
    image on every row if it has pixel_values."""
    n_rows = batch["input_ids"].shape[0]
    has_image = batch["has_image"].tolist() if "has_image" in batch else [("pixel_values" in batch)] * n_rows
    image_of_row = [sum(has_image[:i]) for i in range(len(has_image))]
    images = [image_of_row[i] for i in rows if has_image[i]]
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = [value[i] for i in rows]
        elif key == "pixel_values" and "image_grid_thw" in batch:
            counts = batch["image_grid_thw"].prod(-1).tolist()
            starts = [sum(counts[:k]) for k in range(len(counts))]
            out[key] = torch.cat([value[starts[k]:starts[k] + counts[k]] for k in images]) if images else value[:0]
        elif key in IMAGE_KEYS:
            out[key] = value[torch.tensor(images, dtype=torch.long, device=value.device)]
        else:
            out[key] = value[torch.tensor(rows, dtype=torch.long, device=value.device)]
    if not images:
        for key in IMAGE_KEYS:
            out.pop(key, None)  # a forward with empty image tensors would still try to run the vision tower
    return out
