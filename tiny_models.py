"""Build tiny random models of every supported family, offline, for the demo and the tests.

Nothing can be downloaded here, so we train a small byte-level BPE tokenizer on a corpus, give it each family's
special tokens and a chat template, build LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and a text Llama from small
configs, and save each with `save_pretrained`. Everything else loads them through the same `from_pretrained` path
(modeling.load_policy / ScoreModel.from_pretrained) that a user's real checkpoint takes.

    python tiny_models.py --output_dir models/tiny            # all families, corpus from the toy world
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from families import FAMILIES
from infra.cli import arg, parse_args
from modeling import processor_class

CHAT_SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKEN = {
    "llava": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "text": "",
}
FAMILY_SPECIALS = {
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "llava_onevision": ["<image>", "<video>"],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "text": [],
}
# A ChatML-style template. Content may be a string or a list of {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_TOKEN{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass
class TinyArgs:
    """Build tiny random models of every family (offline) with a locally trained BPE tokenizer."""

    output_dir: str = arg("models/tiny", "folder that receives one sub-folder per family")
    families: list = arg(list(FAMILIES), "families to build")
    vocab_size: int = arg(512, "BPE vocabulary size (special tokens included)")
    hidden_size: int = arg(64, "language-model hidden size")
    num_layers: int = arg(2, "language-model layers")
    num_heads: int = arg(4, "language-model attention heads")
    vision_hidden_size: int = arg(32, "vision-tower hidden size")
    vision_layers: int = arg(1, "vision-tower layers")
    image_size: int = arg(28, "LLaVA vision input size (LLaVA-NeXT tiles of this size; Qwen: 28..56 px)")
    seed: int = arg(0, "initialisation seed")


def default_corpus() -> list[str]:
    """Text the tokenizer is trained on: every sentence of the toy world plus a little general text."""
    from data import toy_world as w

    corpus = [q.format(object=c["object"]) for q in w.QUESTION_TEMPLATES for c in w.CATEGORIES.values()]
    corpus += [w.ANSWER_TEMPLATE.format(colour=colour) for colour in w.COLOURS]
    corpus += [d for table in w.DETAILS.values() for d in table.values()]
    corpus += ["The quick brown fox jumps over the lazy dog.", "Hello, how can I help you today?"]
    return corpus * 4


def train_tokenizer(corpus: list[str], family: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # Byte-level: any text (emoji, right-to-left scripts) tokenises, whatever the corpus held.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIALS + FAMILY_SPECIALS[family],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE.replace("IMAGE_TOKEN", IMAGE_TOKEN[family])
    return tokenizer


def make_processor(family: str, tokenizer, image_size: int = 336, patch_size: int = 14, pinpoints=None,
                   qwen_pixels: tuple[int, int] = (56 * 56, 28 * 28 * 1280)):
    """The family's processor around `tokenizer`: the real image processors (LLaVA: CLIP at image_size, LLaVA-NeXT
    anyres over `pinpoints`, LLaVA-OneVision SigLIP anyres over `pinpoints`; Qwen2(.5)-VL: 14-px patches merged 2 x 2, images resized into qwen_pixels = (min,
    max) pixels). The defaults are the public 7B models' settings; tiny models pass their own."""
    import transformers as tf
    from transformers.models.clip import CLIPImageProcessorPil
    from transformers.models.llava_next import LlavaNextImageProcessorPil
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    if family == "text":
        return tokenizer
    template = tokenizer.chat_template
    if family == "llava_onevision":  # SigLIP at image_size, anyres over `pinpoints`, every patch kept ("full")
        from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

        image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                          image_grid_pinpoints=pinpoints)
        return processor_class(family)(image_processor=image_processor, tokenizer=tokenizer,
                                       num_image_tokens=(image_size // patch_size) ** 2,
                                       vision_feature_select_strategy="full", chat_template=template)
    if family in ("llava", "llava_next"):
        size = {"shortest_edge": image_size}
        crop = {"height": image_size, "width": image_size}
        if family == "llava":
            image_processor, proc_cls = CLIPImageProcessorPil(size=size, crop_size=crop), tf.LlavaProcessor
        else:
            image_processor = LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
            proc_cls = tf.LlavaNextProcessor
        return proc_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                        vision_feature_select_strategy="default", chat_template=template,
                        num_additional_image_tokens=1)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": qwen_pixels[0], "longest_edge": qwen_pixels[1]},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    return processor_class(family)(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def build_tiny_model(family: str, output_dir: str, args: TinyArgs, corpus: list[str]) -> Path:
    """Build, save and return the directory of one tiny model of `family`."""
    import transformers as tf

    torch.manual_seed(args.seed)
    tokenizer = train_tokenizer(corpus, family, args.vocab_size)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=max(1, args.num_heads // 2), max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    patch = args.image_size // 4  # 4x4 patches: 16 image tokens for LLaVA
    clip = dict(hidden_size=args.vision_hidden_size, intermediate_size=2 * args.vision_hidden_size,
                num_hidden_layers=args.vision_layers, num_attention_heads=2, image_size=args.image_size,
                patch_size=patch, projection_dim=args.vision_hidden_size)
    token_id = tokenizer.convert_tokens_to_ids
    if family == "text":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**text))
        processor = tokenizer
    elif family in ("llava", "llava_next"):
        common = dict(vision_config=tf.CLIPVisionConfig(**clip), text_config=tf.LlamaConfig(**text),
                      image_token_index=token_id("<image>"), image_seq_length=(args.image_size // patch) ** 2,
                      vision_feature_layer=-1)
        s = args.image_size
        pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        if family == "llava":
            model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common))
        else:
            model = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
        processor = make_processor(family, tokenizer, image_size=s, patch_size=patch, pinpoints=pinpoints)
    elif family == "llava_onevision":  # a Qwen2 language model under a SigLIP vision tower (MM-RLHF's base)
        s = args.image_size
        pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        siglip = {k: v for k, v in clip.items() if k != "projection_dim"}
        config = tf.LlavaOnevisionConfig(
            text_config=tf.Qwen2Config(**text), vision_config=tf.SiglipVisionConfig(**siglip),
            image_token_index=token_id("<image>"), video_token_index=token_id("<video>"), image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
        model = tf.LlavaOnevisionForConditionalGeneration(config)
        processor = make_processor(family, tokenizer, image_size=s, patch_size=patch, pinpoints=pinpoints)
    else:  # Qwen2-VL / Qwen2.5-VL: 14-px patches merged 2x2; 28..56 px images give 1..4 image tokens
        ids = dict(image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
                   vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"))
        half = args.hidden_size // args.num_heads // 2  # rotary pairs per head, split over (time, height, width)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]}
        if family == "qwen2_vl":
            vision = dict(depth=args.vision_layers, embed_dim=args.vision_hidden_size, hidden_size=args.hidden_size,
                          num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
            model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        else:
            vision = dict(depth=args.vision_layers, hidden_size=args.vision_hidden_size,
                          intermediate_size=2 * args.vision_hidden_size, out_hidden_size=args.hidden_size,
                          num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                          window_size=56, fullatt_block_indexes=[args.vision_layers - 1])
            model = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
        processor = make_processor(family, tokenizer, qwen_pixels=(28 * 28, 56 * 56))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(output_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    return out


def build_tiny_models(args: TinyArgs, corpus: list[str] | None = None) -> dict[str, Path]:
    corpus = corpus or default_corpus()
    return {family: build_tiny_model(family, str(Path(args.output_dir) / family), args, corpus)
            for family in args.families}


if __name__ == "__main__":
    from transformers.utils import logging

    logging.disable_progress_bar()
    args = parse_args(TinyArgs)
    for family, path in build_tiny_models(args).items():
        print(f"{family:11s} -> {path}")
