"""Packing image data: packed == unpacked through LLaVA and the own-code composite, training on packed
llava rows, refusals."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AttentionInterface, DataCollatorForSeq2Seq

from tests.data.test_packing import _grads, _token_losses
from tests.models.test_attention import _leaky_attention
from tests.models.test_vlm import _remote_code_lm
from tests.vision_assets import build_tiny_clip, shape_rows, write_llava_data
from tuneforge.config.loading import load_config
from tuneforge.config.schema import DataConfig, ModelConfig
from tuneforge.data.build import build_datasets
from tuneforge.data.images import ImageCollator
from tuneforge.data.packing import PackedCollator
from tuneforge.data.run import build_run_datasets
from tuneforge.data.tokenize import IGNORE_INDEX
from tuneforge.errors import ConfigError
from tuneforge.models import attention
from tuneforge.models.attention import check_packed_isolation, enable_packed_attention, register_varlen_attention
from tuneforge.models.loading import load_model, load_tokenizer
from tuneforge.models.vlm import fit_to_tokenizer, prepare_image_inputs
from tuneforge.train import train


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def _vlm(lm_dir, clip_dir, dtype="float32", **settings):
    """A tiny VLM (LLaVA around the tiny Llama, by default) with the tiny CLIP tower, its tokenizer and image inputs."""
    config = ModelConfig(path=str(lm_dir), vision={"path": str(clip_dir)}, dtype=dtype, **settings)
    tokenizer = load_tokenizer(config)
    images = prepare_image_inputs(config, tokenizer)
    torch.manual_seed(0)  # the new projector
    model = load_model(config)
    fit_to_tokenizer(model, tokenizer, images)
    return model, tokenizer, images


def _write_mixed_llava(tmp_path):
    """Six rows, every other one with two images; each question names its row, so ids differ."""
    shapes = shape_rows(tmp_path / "images", 8, seed=4)
    records = []
    for index in range(6):
        pictures = [shapes[index]] + ([shapes[index + 2]] if index % 2 else [])
        question = "\n".join(["<image>"] * len(pictures) + [f"Row {index}: which colours?"])
        records.append({
            "image": [p["image"] for p in pictures],
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": " and ".join(p["colour"] for p in pictures)}],
        })
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return DataConfig(datasets=[{"path": str(path), "format": "llava", "image_root": str(tmp_path / "images")}],
                      max_length=128)


@pytest.mark.parametrize(
    ("backend", "language_model"),
    [("sdpa", "llama"), ("eager", "llama"), ("tuneforge_varlen", "llama"), ("sdpa", "own code")],
)
def test_packed_image_batch_losses_and_gradients_equal_unpacked(
    backend, language_model, tmp_path, tiny_model_dir, tokenizer_dir, clip_dir, monkeypatch
):
    # With eager, model.attn_implementation must reach the assembled LLaVA's language model.
    settings = {"attn_implementation": "eager"} if backend == "eager" else {}
    lm_dir = tiny_model_dir
    if language_model == "own code":  # the composite VLM around a trust_remote_code model
        lm_dir = _remote_code_lm(tmp_path / "remote-lm", tokenizer_dir)
        settings.update(trust_remote_code=True)
    model, tokenizer, images = _vlm(lm_dir, clip_dir, **settings)
    if backend == "tuneforge_varlen":
        # As on a CUDA training device; on this CPU the backend takes its float32 path (sdpa
        # with a block-diagonal mask from the same example offsets).
        monkeypatch.setattr(attention, "varlen_available", lambda: True)
    assert enable_packed_attention(model, device="cuda" if backend == "tuneforge_varlen" else None) == backend
    assert model.get_decoder().config._attn_implementation == backend
    assert model.config.vision_config._attn_implementation == "sdpa"  # never packed: left alone
    model.train()

    data = _write_mixed_llava(tmp_path)
    packed_rows = build_datasets(data.model_copy(update={"packing": True}), tokenizer, seed=0, images=images,
                                 use_cache=False).train
    alone_rows = build_datasets(data, tokenizer, seed=0, images=images, use_cache=False).train
    # Best fit decreasing: each two-image example (~68 tokens) shares a row with a one-image
    # one (~48): three rows of two examples and three images.
    assert [row["position_ids"].count(0) for row in packed_rows] == [2, 2, 2]
    assert [len(row["images"]) for row in packed_rows] == [3, 3, 3]

    batch = ImageCollator(PackedCollator(), images.processor)(list(packed_rows))
    assert tuple(batch["pixel_values"].shape) == (9, 3, 32, 32)
    out = model(**batch)
    packed_losses = _token_losses(out.logits[0], batch["labels"][0])
    packed_losses.sum().backward()
    packed_grads = _grads(model)
    model.zero_grad()

    # Reference: each example alone, with its own images, through the unpacked collator.
    padded = ImageCollator(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX), images.processor)
    alone: dict[tuple[int, ...], torch.Tensor] = {}
    for row in alone_rows:
        single = padded([row])
        alone[tuple(row["input_ids"])] = _token_losses(model(**single).logits[0], single["labels"][0])
    alone_total = torch.cat(list(alone.values()))
    alone_total.sum().backward()
    alone_grads = _grads(model)

    cu = batch["cu_seq_lens_q"].tolist()
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    in_packed_order = [alone[tuple(ids[a:b].tolist())] for a, b in zip(cu[:-1], cu[1:])]
    assert len(in_packed_order) == len(alone) == 6
    # Per segment, so that a loss at the wrong place cannot hide in a sum.
    for (a, b), expected in zip(zip(cu[:-1], cu[1:]), in_packed_order):
        torch.testing.assert_close(_token_losses(out.logits[0, a:b], labels[a:b]), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed_losses, torch.cat(in_packed_order), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, alone_total.mean(), atol=2e-6, rtol=1e-6)
    assert packed_grads.keys() == alone_grads.keys()
    assert any("vision_tower" in name for name in packed_grads)  # the images' path is compared too
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], atol=2e-5, rtol=1e-4, msg=name)

    # The same batch with the images in another order gives other losses: the comparison above
    # would catch features landing in the wrong example.
    with torch.no_grad():
        shuffled = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)})
    assert (_token_losses(shuffled.logits[0], labels) - packed_losses).abs().max() > 1e-3


def test_packed_llava_training_learns_and_reports_packing(tmp_path, tiny_model_dir, clip_dir, capsys):
    images = tmp_path / "images"
    rows = shape_rows(images, 48, seed=1)
    settings = {
        "model": {"path": str(tiny_model_dir), "vision": {"path": str(clip_dir)}},
        "data": {"datasets": [{"path": str(write_llava_data(tmp_path / "llava.json", rows)), "format": "llava",
                               "image_root": str(images)}], "max_length": 160, "packing": True},
        "method": {"name": "full"},
        "train": {"per_device_train_batch_size": 4, "max_steps": 24, "learning_rate": 5e-3, "logging_steps": 1,
                  "save_strategy": "no", "use_cpu": True},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = train(settings)
    out = capsys.readouterr().out
    assert "packed batches use attention implementation 'sdpa'" in out
    # Examples of 47 to 49 tokens: three to a row of 160.
    assert re.search(r"packing: 48 examples -> 16 rows of <= 160 tokens, 9\d\.\d% of row slots hold real tokens", out)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 24
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])  # 6.0 -> 3.1 when written
    # The rows it trained on (the run's cache entry): every one holds several examples and their images.
    config = load_config(settings)
    datasets = build_run_datasets(config, load_tokenizer(config.model))
    assert datasets.from_cache and datasets.fingerprint is not None
    assert all(row["position_ids"].count(0) == len(row["images"]) == 3 for row in datasets.train)


def test_packing_refuses_a_language_model_backend_that_cannot_isolate_examples(tiny_model_dir, clip_dir):
    model, _, _ = _vlm(tiny_model_dir, clip_dir)
    AttentionInterface.register("tuneforge_test_leaky", _leaky_attention)
    model.get_decoder().set_attn_implementation("tuneforge_test_leaky")
    with pytest.raises(ConfigError, match="`tuneforge_test_leaky` is not one tuneforge has verified") as info:
        enable_packed_attention(model)
    assert info.value.where == "model.attn_implementation"
    # The packed probe runs through LLaVA into its language model, and catches the leak.
    with pytest.raises(ConfigError, match="`tuneforge_test_leaky` lets packed examples see each other"):
        check_packed_isolation(model)


def test_varlen_backend_refuses_the_non_causal_vision_tower(tiny_model_dir, clip_dir):
    # Why only the language model is switched: on the whole LLaVA, the vision tower's
    # bidirectional attention would otherwise run causally.
    model, _, images = _vlm(tiny_model_dir, clip_dir)
    model.set_attn_implementation(register_varlen_attention())
    input_ids = torch.tensor([[5] + [images.image_token_id] * images.tokens_per_image])
    with pytest.raises(ValueError, match="supports causal attention"):
        model(input_ids=input_ids, pixel_values=torch.zeros(1, 3, 32, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not attention.varlen_available(), reason="needs CUDA and torch.nn.attention.varlen (torch >= 2.10)")
def test_packed_bf16_image_batch_with_the_varlen_kernel_matches_examples_alone(tmp_path, tiny_model_dir, clip_dir):
    model, tokenizer, images = _vlm(tiny_model_dir, clip_dir, dtype="bfloat16")
    assert enable_packed_attention(model, device="cuda") == "tuneforge_varlen"  # includes the packed probe
    model.cuda().train()
    data = _write_mixed_llava(tmp_path)
    packed_rows = build_datasets(data.model_copy(update={"packing": True}), tokenizer, seed=0, images=images,
                                 use_cache=False).train
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in ImageCollator(PackedCollator(), images.processor)(list(packed_rows)).items()}
    packed = model(**batch)
    packed.loss.backward()
    packed_grads = {name: grad.float() for name, grad in _grads(model).items()}
    model.zero_grad()

    # Reference: each example alone, with its own images, through sdpa.
    model.get_decoder().set_attn_implementation("sdpa")
    padded = ImageCollator(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX), images.processor)
    alone: dict[tuple[int, ...], torch.Tensor] = {}
    total, count = 0.0, 0
    for row in build_datasets(data, tokenizer, seed=0, images=images, use_cache=False).train:
        single = {k: v.cuda() for k, v in padded([row]).items()}
        logits = model(**single).logits[0]
        alone[tuple(row["input_ids"])] = logits
        target = single["labels"][0, 1:]
        keep = target != IGNORE_INDEX
        total = total + torch.nn.functional.cross_entropy(logits[:-1][keep].float(), target[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    cu = batch["cu_seq_lens_q"].tolist()
    ids = batch["input_ids"][0].tolist()
    in_packed_order = [alone[tuple(ids[a:b])] for a, b in zip(cu[:-1], cu[1:])]

    # bf16 end to end, as the text-only GPU test (tests/models/test_attention.py).
    gap = (packed.logits[0].float() - torch.cat(in_packed_order).float()).abs().max().item()
    assert gap <= 3e-2, gap
    torch.testing.assert_close(packed.loss.float(), (total / count).float(), atol=2e-3, rtol=2e-3)
    for name, param in model.named_parameters():
        if param.grad is not None:
            expected = param.grad.float()
            assert (packed_grads[name] - expected).abs().max() <= 5e-2 * expected.abs().max() + 1e-4, name
