"""The data layer of Safe RLHF-V: where rows come from, and how they become model inputs.

    data.sources    read + validate rows, one entry point per source, and the reward / cost pair builders:
                    load_pairs (BeaverTails-V: hub id, local parquet layout, JSONL; PKU-SafeRLHF .json/.jsonl),
                    load_sft (SFT / PTX examples), load_prompts (PPO and evaluation prompts; also MM-SafetyBench
                    folders, load_mm_safetybench),
                    reward_pair, cost_pair; DataError names the file, row and field of a bad row
    data.encoding   chat formatting and collation: encode_example, collate, collate_pairs
    data.toy_world  the toy world used by the demo and the tests, with its ground-truth grader

The names below are the public entry points; `from data import load_pairs, encode_example` is all a stage needs.
"""

from data.encoding import chat_messages, collate, collate_pairs, encode_example
from data.sources import (DataError, SkipCounter, cost_pair, load_image, load_mm_safetybench, load_pairs, load_prompts,
                          load_sft, reward_pair, validate_pair_row, validate_sft_row)

__all__ = ["DataError", "SkipCounter", "chat_messages", "collate", "collate_pairs", "cost_pair", "encode_example",
           "load_image", "load_mm_safetybench", "load_pairs", "load_prompts", "load_sft", "reward_pair", "validate_pair_row",
           "validate_sft_row"]
