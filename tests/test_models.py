"""Model loading, the score model and chat formatting for every family (tiny models, offline)."""

import pytest
import torch
from PIL import Image

from conftest import FAMILIES
from data import collate, encode_example
from modeling import ScoreModel, forward_kwargs, last_token_index, load_policy, never_sample_ids
from utils import get_tokenizer

RED = Image.new("RGB", (56, 56), (220, 40, 40))
ODD_IMAGES = [Image.new("RGB", (1, 1), (0, 0, 255)), Image.new("RGB", (6000, 40), (10, 200, 10))]


def _image(family):
    return None if family == "text" else RED


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_loads_and_runs_with_images(tiny_models, family):
    model, processor, detected = load_policy(tiny_models[family])
    assert detected == family
    images = [None] if family == "text" else [RED] + ODD_IMAGES
    examples = [encode_example(processor, family, "What colour is the paint? 🙂 مرحبا", image, "It is red.")
                for image in images]
    batch = collate(examples, get_tokenizer(processor).pad_token_id, "right")
    logits = model(**forward_kwargs(batch, family)).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()
    if family != "text":  # vision tower frozen by default, projector and LM trainable
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(("vision_tower" in n or "visual" in n) and "merger" not in n for n in frozen)
        assert any(p.requires_grad for n, p in model.named_parameters() if "projector" in n or "merger" in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_response_mask_covers_exactly_the_response(tiny_models, family):
    _, processor, _ = load_policy(tiny_models[family])
    tokenizer = get_tokenizer(processor)
    response = "It is red. Keep it sealed and away from children."
    full = encode_example(processor, family, "What colour is the paint?", _image(family), response)
    prompt = encode_example(processor, family, "What colour is the paint?", _image(family))
    n_prompt = prompt["input_ids"].shape[0]
    assert torch.equal(full["input_ids"][:n_prompt], prompt["input_ids"])  # prompt-only is a prefix
    assert not full["response_mask"][:n_prompt].any() and full["response_mask"][n_prompt:].all()
    response_ids = full["input_ids"][full["response_mask"]].tolist()
    assert response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response_ids[:-1]) == response
    assert tokenizer.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        assert full["mm_token_type_ids"].shape == full["input_ids"].shape
        assert (full["mm_token_type_ids"][n_prompt:] == 0).all() and (full["mm_token_type_ids"] == 1).any()
    # SFT labels: -100 outside the response
    batch = collate([full, prompt], tokenizer.pad_token_id, "right")
    assert (batch["labels"][0][full["response_mask"]] == full["input_ids"][full["response_mask"]]).all()
    assert (batch["labels"][0][~full["response_mask"]] == -100).all() and (batch["labels"][1] == -100).all()


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_score_model_same_under_left_and_right_padding(tiny_models, family, tmp_path):
    model, processor = ScoreModel.from_pretrained(tiny_models[family])
    model.eval()
    pad = get_tokenizer(processor).pad_token_id
    examples = [encode_example(processor, family, q, _image(family), r) for q, r in
                [("What colour is the paint?", "It is red."),
                 ("Tell me the colour of the knife, please, in a long question.", "It is red. Keep the blade clean.")]]
    with torch.no_grad():
        right_scores, right_end = model(collate(examples, pad, "right"))
        left_scores, left_end = model(collate(examples, pad, "left"))
        alone = torch.stack([model(collate([e], pad))[1][0] for e in examples])
    assert torch.allclose(right_end, left_end, atol=1e-5)
    assert torch.allclose(right_end, alone, atol=1e-5)
    # the end score is the head applied to the last real token
    batch = collate(examples, pad, "right")
    with torch.no_grad():
        hidden = model.backbone(**forward_kwargs(batch, family)).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1
    expected = model.score_head(hidden[torch.arange(2), last]).squeeze(-1)
    assert torch.allclose(right_end, expected, atol=1e-6)
    assert right_scores.shape == batch["input_ids"].shape
    # save -> reload gives the same scores
    model.save_pretrained(tmp_path / "score", processor)
    reloaded, _ = ScoreModel.from_pretrained(str(tmp_path / "score"))
    with torch.no_grad():
        assert torch.allclose(reloaded(batch)[1], right_end, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "text"])
def test_generate_never_samples_placeholders_and_logprobs_match_forward(tiny_models, family):
    torch.manual_seed(0)
    model, processor, _ = load_policy(tiny_models[family])
    tokenizer = get_tokenizer(processor)
    examples = [encode_example(processor, family, q, _image(family)) for q in
                ["What colour is the paint?", "Which colour is this candle, tell me now?"]]
    batch = collate(examples, tokenizer.pad_token_id, "left")
    banned = never_sample_ids(processor)
    assert tokenizer.pad_token_id in banned and tokenizer.eos_token_id not in banned
    kwargs = forward_kwargs(batch, family)
    kwargs.pop("position_ids", None)  # generate derives positions from the attention mask itself
    out = model.generate(**kwargs, max_new_tokens=12, do_sample=True, suppress_tokens=banned,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    assert not torch.isin(new, torch.tensor(banned)).any()
    # log-probs of the sampled tokens: generate's logits vs a fresh forward (left padding)
    gen_logp = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    full = {**batch, "input_ids": out.sequences,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(new)], 1)}
    if "mm_token_type_ids" in batch:
        full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(new)], 1)
    with torch.no_grad():
        logits = model(**forward_kwargs(full, family)).logits
    fwd_logp = logits[:, :-1].log_softmax(-1).gather(-1, out.sequences[:, 1:, None]).squeeze(-1)[:, -new.shape[1]:]
    assert torch.allclose(gen_logp, fwd_logp, atol=1e-4)


@pytest.mark.parametrize("family,quantization,layer", [("llava", "8bit", "Linear8bitLt"), ("llava", "4bit", "Linear4bit"),
                                                      ("qwen2_vl", "8bit", "Linear8bitLt")])
def test_quantized_loading_leaves_vision_tower_and_projector_unquantized(tiny_models, family, quantization, layer):
    model, processor, _ = load_policy(tiny_models[family], quantization=quantization)
    kinds = lambda part: {type(m).__name__ for n, m in model.named_modules()
                          if part in n and isinstance(m, torch.nn.Linear)}
    assert kinds("language_model") == {layer}  # every LM projection quantized (the LM head is skipped)
    vision_parts = ["vision_tower", "multi_modal_projector"] if family == "llava" else ["visual"]  # Qwen: merger inside
    for part in vision_parts:
        assert kinds(part) == {"Linear"}, part
    batch = collate([encode_example(processor, family, "What colour?", RED, "It is red.")],
                    get_tokenizer(processor).pad_token_id)
    assert torch.isfinite(model(**forward_kwargs(batch, family)).logits).all()
    score_model, _ = ScoreModel.from_pretrained(tiny_models[family], quantization=quantization)
    assert torch.isfinite(score_model(batch)[1]).all()
