"""Chat formatting and collation: (image, question[, response]) -> the tensors every model of the pipeline takes.

encode_example renders one conversation through the processor's chat template and marks the response tokens
(`response_mask`); collate pads a list of encoded examples into a batch and carries each family's image tensors;
collate_pairs stacks the two sides of preference pairs so that a score model scores them in one forward.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image

from modeling import IMAGE_KEYS, get_tokenizer


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


def _encode_prompt(processor, family: str, question: str, image) -> dict:
    prompt_text = processor.apply_chat_template(
        chat_messages(question, image is not None, family=family), add_generation_prompt=True, tokenize=False
    )
    if image is not None:
        enc = processor(images=[image], text=[prompt_text], return_tensors="pt", add_special_tokens=False)
    else:
        enc = get_tokenizer(processor)([prompt_text], return_tensors="pt", add_special_tokens=False)
    return dict(enc)


def encode_example(
    processor,
    family: str,
    question: str,
    image: Image.Image | None = None,
    response: str | None = None,
    max_length: int | None = None,
    stats: Counter | None = None,
    add_eos: bool = True,
) -> dict:
    """Model inputs for one (image or none, question, response or none) through the processor's chat template.

    Prompt-only (response=None): the user turn with the generation prompt appended, for rollouts.
    Prompt + response: response tokens (tokenised on their own, then EOS) follow the prompt, and `response_mask`
    marks exactly them, so the SFT loss, the score and every PPO mean see the response and nothing else.
    Too long: the question is truncated from the left (its end, usually the actual ask, is kept) and
    stats["truncated_question"] is counted; if the response alone does not fit it is cut on the right
    (stats["truncated_response"], and then there is no EOS).
    """
    tokenizer = get_tokenizer(processor)
    response_ids = []
    if response is not None:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])
    enc = _encode_prompt(processor, family, question, image)
    if max_length is not None and enc["input_ids"].shape[1] + len(response_ids) > max_length:
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        overhead = enc["input_ids"].shape[1] - len(question_ids)  # template + image tokens
        if overhead + len(response_ids) > max_length - 1 and response is not None:
            keep = max(1, max_length - overhead - 1)
            response_ids = response_ids[:keep]
            if stats is not None:
                stats["truncated_response"] += 1
        budget = max_length - len(response_ids)
        for _ in range(8):  # decode/encode is not exactly invertible; shrink until it fits
            if enc["input_ids"].shape[1] <= budget:
                break
            over = enc["input_ids"].shape[1] - budget
            question_ids = question_ids[over:]
            question = tokenizer.decode(question_ids, skip_special_tokens=True)
            enc = _encode_prompt(processor, family, question, image)
        if enc["input_ids"].shape[1] > budget:
            raise ValueError(f"cannot fit the prompt into max_length={max_length}: the template and image need "
                             f"{overhead} tokens; raise --max_length")
        if stats is not None:
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
    """Pad encoded examples into a batch and carry each family's image tensors: `pixel_values` (LLaVA: one per
    image; LLaVA-NeXT: patches padded to the batch maximum, `image_sizes` says which are real; Qwen: patches
    concatenated with `image_grid_thw`) and Qwen's `mm_token_type_ids`. Labels are -100 outside the response."""
    batch = {
        "input_ids": _pad([e["input_ids"] for e in examples], pad_token_id, padding_side),
        "attention_mask": _pad([e["attention_mask"] for e in examples], 0, padding_side),
        "response_mask": _pad([e["response_mask"] for e in examples], False, padding_side),
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
