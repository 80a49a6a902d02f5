"""train.vlm on a few synthetic images: the tokenizer and chat template, the training chats and their labels, and a
tiny run whose saved directory our VLMEngine loads and scores exactly as transformers' model does, reproducibly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

from runtime.tokenizer import ChatTokenizer
from runtime.vlm_engine import VLMEngine, VLMEngineConfig
from tests.vlm_checkpoints import hf_inputs
from train.data import decode_file, list_folder
from train.generate import write_dataset
from train.vlm import IGNORE, Architecture, Chats, make_batch, main, vision_spec
from train.vlm_tokenizer import (EXPLAIN_PROMPT, SCORE_PROMPT, SPECIAL_TOKENS, corpus, explanation, save_tokenizer,
                                 train_tokenizer)

TINY_ARGS = ["--size", "64", "--vision-hidden", "32", "--vision-depth", "2", "--vision-heads", "2", "--deepstack", "0",
             "--text-hidden", "64", "--text-layers", "2", "--text-heads", "2", "--text-kv-heads", "1",
             "--text-intermediate", "96", "--batch-size", "4", "--steps", "12", "--lr", "3e-3", "--warmup-steps", "2",
             "--explain-share", "0.5", "--explain-examples", "1", "--no-progress"]
ENGINE = VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=256, max_num_batched_tokens=512, block_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "set"
    write_dataset(out, seed=3, n=8)
    return out


def train_run(data, out, seed: int = 0):
    main(["--data", str(data), "--val", str(data), "--out", str(out), "--seed", str(seed), *TINY_ARGS])
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    return train_run(tiny_data, tmp_path_factory.mktemp("vlm") / "model")


def test_explanations_name_the_relevant_classes():
    assert explanation(1, ["cone", "car", "cone", "barrier", "worker", "barrel"]) == \
        "Yes: traffic cones, a barrier and a barrel."
    assert explanation(1, ["machinery"]) == "Yes: construction machinery."
    assert explanation(0, ["car", "sign", "car", "person"]) == "No roadwork: cars, a pedestrian and a sign."
    assert explanation(0, []) == "No roadwork: an open road."


def test_tokenizer_answers_are_single_tokens_and_template_matches_transformers(tmp_path):
    save_tokenizer(train_tokenizer(corpus(["Yes: barriers.", "No roadwork: cars and a sign."]), 400), tmp_path, 512)
    ours = ChatTokenizer.load(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert [ours.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len({ours.single_token_id("Yes"), ours.single_token_id("No")}) == 2
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SCORE_PROMPT}]}],
             [{"role": "system", "content": "You judge street images."},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": EXPLAIN_PROMPT}]},
              {"role": "assistant", "content": "Yes: barriers."}]]
    for chat in chats:
        for generation_prompt in (True, False):
            expected = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
            assert ours.encode_chat(chat, generation_prompt) == expected["input_ids"]
    assert ours.decode(ours.encode("Yes: road-work signs.")) == "Yes: road-work signs."


def test_batch_labels_mark_the_decision_and_the_rest_of_each_answer(tiny_data, tmp_path):
    folder = list_folder(tiny_data)
    save_tokenizer(train_tokenizer(corpus([explanation(int(l), c) for l, c in zip(folder.labels, folder.box_classes)]),
                                   400), tmp_path, 512)
    tokenizer = ChatTokenizer.load(tmp_path)
    spec = vision_spec(Architecture(size=64))
    chats = Chats(tokenizer, spec.num_tokens(224, 224))
    assert chats.score_prompt.count(chats.image_pad) == 4
    images = torch.zeros(4, 64, 64, 3, dtype=torch.uint8)
    labels = folder.labels[[0, 1, 6, 7]]  # none, none, roadwork, roadwork
    assert labels.tolist() == [0, 0, 1, 1]
    texts = [tokenizer.encode(explanation(int(l), folder.box_classes[i])) for l, i in zip(labels, [0, 1, 6, 7])]
    batch = make_batch(chats, images, labels, texts, 1, spec)
    assert batch.pixel_values.shape == (4 * 16, spec.row_size) and batch.image_grid_thw.tolist() == [[1, 4, 4]] * 4
    for row in range(4):
        ids = batch.input_ids[row]
        prompt = chats.explain_prompt if row == 0 else chats.score_prompt
        answer = texts[0] if row == 0 else [chats.answer(int(labels[row]))]
        end = len(prompt) + len(answer) + 1
        assert ids[:end].tolist() == prompt + answer + [chats.im_end]
        assert (ids[end:] == chats.pad).all()
        decision = torch.nonzero(batch.score_labels[row] != IGNORE).flatten().tolist()
        assert decision == [len(prompt)] and batch.score_labels[row, len(prompt)] == chats.answer(int(labels[row]))
        text = torch.nonzero(batch.text_labels[row] != IGNORE).flatten().tolist()
        assert text == list(range(len(prompt) + 1, end))
    assert (batch.mm_token_type_ids == (batch.input_ids == chats.image_pad)).all()


def test_saved_model_scores_alike_in_engine_and_transformers(trained, tiny_data):
    files = sorted(p.name for p in trained.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                     "tokenizer.json", "tokenizer_config.json", "training.json"]
    folder = list_folder(tiny_data)
    images = [np.array(decode_file(tiny_data / f)) for f in folder.files[:3]]
    engine = VLMEngine.load(trained, config=ENGINE)
    assert engine.stop_token_ids == {engine.tokenizer.token_id("<|im_end|>")}
    request_id = engine.add_request(SCORE_PROMPT, [images[0]])
    seq = engine.requests[request_id]
    batch = engine.scheduler.schedule()
    ours = engine.runner.run(batch, all_positions=True)
    engine.cancel(request_id)
    ref_model = Qwen3VLForConditionalGeneration.from_pretrained(trained, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers' own image processor, from our preprocessor_config.json
        ref = ref_model(**hf_inputs(trained, seq.token_ids, [images[0]])).logits[0]
    assert ours.shape == ref.shape
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    yes, no = engine.score_token_ids
    # Training taught the answer position to say Yes or No (a few steps lift them above the other 440 tokens).
    assert set(torch.topk(ref[-1], 2).indices.tolist()) == {yes, no}
    scores = engine.score(images, SCORE_PROMPT)
    for image, score in zip(images, scores):
        with torch.no_grad():
            logits = ref_model(**hf_inputs(trained, seq.token_ids, [image])).logits[0, -1]
        assert score.p_yes == pytest.approx(torch.softmax(logits[[yes, no]], dim=0)[0].item(), abs=1e-5)


def test_training_record_and_reproducibility(trained, tiny_data, tmp_path):
    record = json.loads((trained / "training.json").read_text())
    assert record["steps"] == 12 and record["images"] == 8 and record["threads"] == 1
    assert [h["step"] for h in record["history"]] == [2, 4, 6, 8, 10, 12]  # once per epoch of 2 steps
    final = record["val_runtime"]
    assert final["n"] == 8 and 0 <= final["accuracy"] <= 1 and -1 <= final["mcc"] <= 1
    assert len(final["explanations"]["examples"]) == 2
    assert record["size_bytes"] == (trained / "model.safetensors").stat().st_size
    again = train_run(tiny_data, tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (again / name).read_bytes() == (trained / name).read_bytes(), name
    assert json.loads((again / "training.json").read_text())["history"] == record["history"]
