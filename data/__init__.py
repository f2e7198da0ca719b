"""The data layer of Safe RLHF-V: where rows come from, and how they become model inputs.

    data.sources    read + validate rows, one entry point per source, and the reward / cost pair builders:
                    load_pairs (BeaverTails-V: hub id, local parquet layout, JSONL; PKU-SafeRLHF .json/.jsonl),
                    load_sft (SFT / PTX examples), load_prompts (PPO and evaluation prompts; also MM-SafetyBench
                    folders, load_mm_safetybench),
                    reward_pair, cost_pair, preference_pair (one dimension: helpful or safe); DataError names
                    the file, row and field of a bad row; SkipCounter
                    counts skipped rows by reason and keeps the first rows of each;
                    images stay encoded in the rows (ImageRef) until open_image decodes one;
                    held-out data: eval_source picks (source, split), overlapping_rows finds eval rows that are
                    also training rows
    data.encoding   chat formatting and collation: encode_example (BOS, neutralised control strings, images
                    decoded here), check_images (images the processor would refuse, found at load time),
                    collate (+ has_image), collate_pairs, select_rows
    data.toy_world  the toy world used by the demo and the tests, with its ground-truth grader

The names below are the public entry points; `from data import load_pairs, encode_example` is all a stage needs.
"""

from data.encoding import (chat_messages, check_images, collate, collate_pairs, encode_example, image_problem,
                           select_rows)
from data.sources import (PREFERENCES, DataError, ImageRef, SkipCounter, cost_pair, eval_source, image_size,
                          is_hub_id, load_image, load_mm_safetybench, load_pairs, load_prompts, load_sft, open_image,
                          overlapping_rows, preference_pair, reward_pair, row_key, validate_pair_row,
                          validate_sft_row)

__all__ = ["PREFERENCES", "DataError", "ImageRef", "SkipCounter", "chat_messages", "check_images", "collate",
           "collate_pairs", "cost_pair", "encode_example", "eval_source", "image_problem", "image_size", "is_hub_id",
           "load_image", "load_mm_safetybench", "load_pairs", "load_prompts", "load_sft", "open_image",
           "overlapping_rows", "preference_pair", "reward_pair", "row_key", "select_rows", "validate_pair_row",
           "validate_sft_row"]
