"""A vision-language model assembled from a language model and a vision tower (`model.vision`,
LLaVA layout, as heron trains with DeepSpeed) under DeepSpeed ZeRO-3 on 2 CPU processes.

The real path of tests/train/test_zero3_cpu.py (its shim and worker in tests/support/, its skip):
transformers loads the language model and the tower partitioned (`deepspeed.zero.Init`);
tuneforge builds the LLaVA shell around them outside `zero.Init` (inside it transformers
initialised the `meta` shell gathered: "Cannot copy out of meta tensor"), adds the image token's
embedding row (the vocabulary read from the partitions' `ds_shape`, not their empty tensors),
and the Trainer wraps it all in DeepSpeed's engine. Stage 2 as heron runs it: LoRA on the
language model, the projector trained in full with it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train.test_distributed import STEPS, write_config
from tests.train.test_zero3_cpu import MISSING, SUPPORT, ZERO3, _worker_path, assert_partitioned, losses
from tests.vision_assets import build_tiny_clip, shape_rows, write_llava_data
from tuneforge.train.run_dir import read_run_metadata

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, Path]:
    """4 LoRA steps of the assembled VLM on 2 partitioned ranks; returns the run directory, what
    the worker recorded and one training image."""
    tmp_path = tmp_path_factory.mktemp("zero3-vlm")
    images = tmp_path / "images"
    rows = shape_rows(images, 16, seed=3)
    config = write_config(tmp_path, tiny_model_dir, "vlm", method={"name": "lora", "r": 4}, distributed=ZERO3,
                          train={"report_to": "none"})
    settings = yaml.safe_load(config.read_text())
    settings["model"]["vision"] = {"path": str(build_tiny_clip(tmp_path / "clip"))}
    settings["data"] = {"datasets": [{"path": str(write_llava_data(tmp_path / "llava.json", rows)), "format": "llava",
                                      "image_root": str(images)}], "max_length": 64}
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    recorded = tmp_path / "live"
    recorded.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(SUPPORT / "zero3_worker.py"), str(recorded), str(config)],
        check=False, env=dict(os.environ, PYTHONPATH=_worker_path(), DS_ACCELERATOR="cpu"),
        capture_output=True, text=True, timeout=300,
    )
    # A rank's own error first: the tail is mostly the other rank's "Connection closed by peer".
    errors = [line for line in (finished.stdout + finished.stderr).splitlines() if "Error: " in line]
    assert finished.returncode == 0, "\n".join(errors[:3]) + "\n" + finished.stderr[-3000:]
    return tmp_path / "vlm", recorded, images / rows[0]["image"]


def test_assembled_vlm_trains_partitioned_with_the_image_token_in_its_vocabulary(vlm_run, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    run_dir, recorded, _ = vlm_run
    logged = losses(run_dir)
    assert len(logged) == STEPS and all(math.isfinite(loss) for loss in logged), logged
    assert logged[-1] < logged[0], logged
    assert_partitioned(recorded, "vlm")  # tower, language model, adapters and projector alike

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "model"))
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(str(tiny_model_dir))) + 1  # the image token
    saved = AutoConfig.from_pretrained(read_run_metadata(run_dir / "model")["base_model"])
    assert saved.text_config.vocab_size == len(tokenizer)  # not 0: read from ds_shape
    assert tokenizer.convert_ids_to_tokens(saved.image_token_id) == "<image>"


def test_assembled_vlm_export_reloads_and_answers_about_an_image(vlm_run, tiny_model_dir):
    """As tuneforge's VLM tests reload theirs: the run's base (the assembled model, saved before
    training) with the adapter on top, then generation with an image. The base holds the
    pretrained weights gathered from the partitions, not their empty tensors."""
    import torch
    from safetensors.torch import load_file

    from tuneforge.infer import generate, load_for_inference

    run_dir, _, image = vlm_run
    loaded = load_for_inference(str(run_dir))
    assert loaded.images is not None
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer)
    reloaded = {name.replace(".base_layer", ""): value for name, value in loaded.model.state_dict().items()}
    pretrained = {
        "language_model.layers.0.mlp.down_proj.weight":
            load_file(str(tiny_model_dir / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"],
        "vision_tower.encoder.layers.0.mlp.fc1.weight":
            load_file(str(run_dir.parent / "clip" / "model.safetensors"))["encoder.layers.0.mlp.fc1.weight"],
    }
    for suffix, expected in pretrained.items():
        [name] = [name for name in reloaded if name.endswith(suffix)]
        assert torch.equal(reloaded[name], expected), name
    answer = generate(loaded, [QUESTION], images=[[str(image)]], max_new_tokens=3)
    assert isinstance(answer[0], str)
