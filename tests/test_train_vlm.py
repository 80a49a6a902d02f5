"""train.vlm on a few synthetic images: the tokenizer and chat template, the training chats and their labels, and a
tiny run whose saved directory our VLMEngine loads and scores exactly as transformers' model does, reproducibly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch as st
import torch
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

from kernels.vlm_preprocess import vision_input_reference
from runtime.vlm.tokenizer import ChatTokenizer
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from fixtures.checkpoints import IMAGENET, make_dinov3
from fixtures.vlm_checkpoints import hf_inputs
from train.data import decode_file, list_folder
from train.generate import write_dataset
from train.vlm import IGNORE, Architecture, Chats, make_batch, main, vision_spec
from train.vlm_vision_init import architecture_overrides, copy_backbone, freeze_backbone, read_backbone
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


def dinov3_in_tower_order(ref, pixels: torch.Tensor, grid: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' DINOv3 layers on the patch tokens alone (no CLS/registers), in the tower's 2x2 merge-block
    order, rotated as Qwen3-VL rotates (angle = integer row/column x inv_freq), then DINOv3's final norm."""
    tokens = ref.embeddings.patch_embeddings(pixels).flatten(2).transpose(1, 2)
    half = grid // 2
    block_y, block_x, in_y, in_x = torch.meshgrid(*[torch.arange(n) for n in (half, half, 2, 2)], indexing="ij")
    rows, cols = (2 * block_y + in_y).flatten(), (2 * block_x + in_x).flatten()
    tokens = tokens[:, rows * grid + cols]
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    for layer in ref.model.layer:
        tokens = layer(tokens, position_embeddings=(angles.cos(), angles.sin()))
    return ref.norm(tokens)[0]


def test_vision_tower_from_dinov3_maps_every_weight(tmp_path):
    """With CLS/register tokens left out and Qwen3-VL's RoPE angles on both sides (the two differences the module
    docstring names), transformers' DINOv3 and the filled Qwen3-VL tower compute the same features: patch
    embedding over two frames, fused qkv with the missing key bias, layer scales folded, final norm -> merger."""
    ref = make_dinov3(tmp_path, image_size=64, hidden_act="gelu")  # perturbed: biases and layer scales matter
    cfg, preprocessor, backbone = read_backbone(tmp_path)
    overrides = architecture_overrides(cfg, preprocessor)
    assert overrides["image_mean"] == tuple(IMAGENET["image_mean"]) and overrides["vision_depth"] == 2
    arch = Architecture(size=64, deepstack=(0,), text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1,
                        text_intermediate=96, **overrides)
    model = Qwen3VLForConditionalGeneration(arch.config(vocab_size=64)).eval()
    visual = model.model.visual
    copy_backbone(visual, cfg, backbone)
    image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows, grid = vision_input_reference(image, vision_spec(arch))
    mean, std = (torch.tensor(preprocessor[k])[:, None, None] for k in ("image_mean", "image_std"))
    pixels = ((image.permute(2, 0, 1).float() / 255 - mean) / std)[None]
    with torch.no_grad():
        ours = visual.merger.norm(visual(rows, grid_thw=torch.tensor([grid])).last_hidden_state)
        expected = dinov3_in_tower_order(ref, pixels, 4, visual.rotary_pos_emb.inv_freq)
    assert ours.shape == expected.shape == (16, 64)
    assert torch.allclose(ours, expected, atol=2e-4), (ours - expected).abs().max()
    frozen = freeze_backbone(visual)
    assert frozen == sum(p.numel() for p in (*visual.patch_embed.parameters(), *visual.pos_embed.parameters(),
                                              *visual.blocks.parameters()))
    assert all(p.requires_grad for p in visual.merger.parameters())


def test_cli_starts_the_vision_tower_from_dinov3(tiny_data, tmp_path):
    """--vision-from copies the backbone and takes its widths; --vision-lr-scale 0 then leaves the copied blocks
    exactly as copied (AdamW's step and decay both scale with the learning rate) while the rest trains."""
    make_dinov3(tmp_path / "dinov3", image_size=64, hidden_act="gelu")
    out = tmp_path / "vlm"
    main(["--data", str(tiny_data), "--out", str(out), "--vision-from", str(tmp_path / "dinov3"),
          "--vision-lr-scale", "0", "--save-dtype", "float32", *TINY_ARGS])
    cfg = json.loads((out / "config.json").read_text())["vision_config"]
    assert (cfg["hidden_size"], cfg["depth"], cfg["intermediate_size"], cfg["hidden_act"]) == (64, 2, 128, "gelu")
    _, preprocessor, backbone = read_backbone(tmp_path / "dinov3")
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == preprocessor["image_mean"]
    saved = st.load_file(out / "model.safetensors")
    qkv = torch.cat([backbone[f"layer.1.attention.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(saved["model.visual.blocks.1.attn.qkv.weight"], qkv)
    assert json.loads((out / "training.json").read_text())["vision_from"] == str(tmp_path / "dinov3")
