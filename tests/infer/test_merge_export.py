"""merge and export: merged = adapter-on-base, exports load alone with plain Auto classes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.conftest import successor_rows, write_jsonl
from tests.models.custom_code import write_custom_checkpoint
from tuneforge.cli import export as export_verb
from tuneforge.cli import main as cli_main
from tuneforge.cli import merge as merge_verb
from tuneforge.data.templates import (
    encode_prompt_for_generation,
    template_from_metadata,
)
from tuneforge.infer import encode_for_model, load_for_inference
from tuneforge.infer.export import export_model
from tuneforge.infer.merge import DEFAULT_MAX_LOGIT_GAP, MergeError, merge_run
from tuneforge.train import train
from tuneforge.train.run_dir import read_run_metadata

TEXT = "after 41\n### Answer:\n42 The quick brown fox"
PROMPT = "after 7"
SHARD = "60KB"  # the tiny Llama is ~210 KB in float32


def run_config(root: Path, model_dir: Path, *, method: dict, model: dict | None = None, template: str | None = None) -> dict:
    data = write_jsonl(root / "train.jsonl", successor_rows(16))
    spec = {"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}
    if template:
        spec["template"] = template
    return {
        "model": {"path": str(model_dir), **(model or {})},
        "data": {"datasets": [spec], "max_length": 48},
        "method": method,
        "train": {"max_steps": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True},
        "output": {"dir": str(root / "run")},
    }


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_model_dir) -> Path:
    """LoRA r4 on the tiny Llama, default (qa) template: the terminator is the EOS."""
    root = tmp_path_factory.mktemp("qa-run")
    return train(run_config(root, tiny_model_dir, method={"name": "lora", "r": 4})).run_dir


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory, tiny_model_dir) -> Path:
    """LoRA with chatml: `<|im_end|>` is a new special token, so the vocabulary grows."""
    root = tmp_path_factory.mktemp("chatml-run")
    config = run_config(
        root, tiny_model_dir, method={"name": "lora", "r": 4}, template="chatml",
        model={"new_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    )
    return train(config).run_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("full-run")
    return train(run_config(root, tiny_model_dir, method={"name": "full"})).run_dir


@pytest.fixture(scope="module")
def merged_qa(qa_run, tmp_path_factory):
    return merge_run(qa_run, tmp_path_factory.mktemp("merged") / "qa", dtype="float32")


def ids_of(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


def adapter_on_base(run: Path, base: Path, vocab: int):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(vocab, mean_resizing=False)  # rows come from the adapter
    return PeftModel.from_pretrained(model, str(run / "model"))


def tensor_dtypes(directory: Path) -> set[torch.dtype]:
    found = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            found |= {handle.get_tensor(name).dtype for name in handle.keys()}
    return found


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("run_name", ["qa_run", "chatml_run"])
def test_merged_logits_equal_adapter_logits_and_differ_from_base(run_name, request, tmp_path, tiny_model_dir):
    run = request.getfixturevalue(run_name)
    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))
    report = merge_run(run, tmp_path / "merged", dtype="float32")
    assert report.max_logit_gap <= 1e-5 and report.threshold == DEFAULT_MAX_LOGIT_GAP["float32"]
    assert report.adapter_effect > 1e-2  # the adapter trained: the check compares something

    special = tokenizer.convert_tokens_to_ids(["<|im_end|>"]) if run_name == "chatml_run" else []
    ids = torch.cat([ids_of(tokenizer), torch.tensor([special], dtype=torch.long)], dim=1)
    merged = AutoModelForCausalLM.from_pretrained(str(report.out_dir))
    assert merged.dtype == torch.float32
    adapter = logits(adapter_on_base(run, tiny_model_dir, len(tokenizer)), ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    assert torch.allclose(logits(merged, ids), adapter, atol=1e-5, rtol=0)
    assert (logits(merged, ids) - logits(base, ids)).abs().max() > 1e-2


def test_export_loads_offline_with_plain_auto_classes(qa_run, tmp_path):
    out = export_model(qa_run, tmp_path / "export")
    assert read_run_metadata(out)["adapter"] is False
    assert not [p.name for p in out.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    # A fresh interpreter that imports only transformers, with the hub switched off.
    script = (
        "import json, sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tokenizer.apply_chat_template([{'role': 'user', 'content': sys.argv[2]}], add_generation_prompt=True)\n"
        "ids = ids['input_ids'] if hasattr(ids, 'keys') else ids\n"
        "eos = model.generation_config.eos_token_id\n"
        "print(json.dumps({'ids': list(ids), 'eos': eos if isinstance(eos, list) else [eos], 'modules': sorted(m for m in sys.modules if m.split('.')[0] == 'tuneforge')}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(out), PROMPT], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    run_model = load_for_inference(str(qa_run), device="cpu")
    assert loaded["ids"] == encode_for_model(run_model, PROMPT)
    assert run_model.template is not None
    assert set(run_model.template.stop_token_ids(run_model.tokenizer)) <= set(loaded["eos"])
    assert loaded["modules"] == []  # transformers alone loads it


def test_export_carries_a_new_terminator(chatml_run, tmp_path):
    """chatml's `<|im_end|>` is not the tokenizer's EOS: only the export's config can say to stop there."""
    out = export_model(chatml_run, tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id
    assert end_of_turn in GenerationConfig.from_pretrained(str(out)).eos_token_id
    run_tokenizer = AutoTokenizer.from_pretrained(str(chatml_run / "model"))
    template = template_from_metadata(read_run_metadata(chatml_run / "model")["template"])
    expected = encode_prompt_for_generation(run_tokenizer, template, PROMPT, None)
    assert prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}]) == expected
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_load_for_inference_of_a_run_with_new_tokens(chatml_run):
    loaded = load_for_inference(str(chatml_run), device="cpu")
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer)


def test_sharded_export_reloads_equal(merged_qa, tmp_path):
    out = export_model(merged_qa.out_dir, tmp_path / "sharded", max_shard_size=SHARD)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    original = AutoModelForCausalLM.from_pretrained(str(merged_qa.out_dir)).state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[name], reloaded[name]) for name in original)


def test_dtype_option_is_respected(qa_run, merged_qa, tmp_path):
    out = export_model(merged_qa.out_dir, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert tensor_dtypes(out) == {torch.bfloat16}
    report = merge_run(qa_run, tmp_path / "fp16", dtype="float16")
    assert report.dtype == "float16" and report.threshold == DEFAULT_MAX_LOGIT_GAP["float16"]
    assert tensor_dtypes(report.out_dir) == {torch.float16}


def test_full_run_given_to_merge_points_to_export(full_run, tmp_path):
    with pytest.raises(MergeError) as info:
        merge_run(full_run, tmp_path / "merged")
    assert "no adapter to merge" in str(info.value)
    assert f"tuneforge export {full_run} --out DIR" in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_full_run_exports_self_contained(full_run, tmp_path):
    out = export_model(full_run, tmp_path / "export", max_shard_size=SHARD)
    assert not (out / "training_args.bin").exists() and len(list(out.glob("model-*.safetensors"))) >= 2
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = ids_of(tokenizer)
    source = AutoModelForCausalLM.from_pretrained(str(full_run / "model"))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(str(out)), ids), logits(source, ids))
    assert tokenizer.eos_token_id in GenerationConfig.from_pretrained(str(out)).eos_token_id


def test_logit_gap_above_the_limit_fails_and_keeps_nothing(qa_run, tmp_path):
    with pytest.raises(MergeError) as info:
        merge_run(qa_run, tmp_path / "merged", dtype="bfloat16", max_logit_gap=1e-9)
    assert "logits differ from adapter-on-base" in str(info.value) and "--max-logit-gap" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging directory


def test_quantized_base_is_refused(qa_run, tiny_model_dir, tmp_path):
    base = tmp_path / "base-4bit"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"bitsandbytes weights.*peft#2321"):
        merge_run(qa_run, tmp_path / "merged", base_model=str(base))


def test_remote_code_base_travels_with_the_export(tmp_path, tokenizer_dir, tokenizer):
    custom = write_custom_checkpoint(tmp_path / "custom", tokenizer_dir, len(tokenizer))
    config = run_config(tmp_path, custom, method={"name": "lora", "r": 4}, model={"init": "random", "trust_remote_code": True})
    run = train(config).run_dir
    report = merge_run(run, tmp_path / "merged")
    assert {"modeling_tiny_custom.py", "configuration_tiny_custom.py", "layers_tiny_custom.py"} <= set(report.files)
    ids = ids_of(tokenizer)
    expected = logits(AutoModelForCausalLM.from_pretrained(str(report.out_dir), trust_remote_code=True), ids)
    moved = tmp_path / "elsewhere"
    shutil.move(str(report.out_dir), moved)
    shutil.rmtree(run)  # its base/ held the random weights and the code
    shutil.rmtree(custom)
    reloaded = AutoModelForCausalLM.from_pretrained(str(moved), trust_remote_code=True)
    assert type(reloaded).__name__ == "TinyCustomForCausalLM"
    assert torch.equal(logits(reloaded, ids), expected)


@pytest.fixture
def verbs(monkeypatch):
    """`main` with the merge and export verbs, whether or not cli/main.py lists them yet."""
    monkeypatch.setitem(cli_main.VERBS, "merge", merge_verb)
    monkeypatch.setitem(cli_main.VERBS, "export", export_verb)
    return cli_main.main


def test_cli_merge_then_export(verbs, qa_run, tmp_path, capsys):
    assert verbs(["merge", str(qa_run), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"written to {tmp_path / 'merged'}" in out and "max logit gap vs adapter-on-base" in out
    code = verbs(["export", str(tmp_path / "merged"), "--out", str(tmp_path / "export"), "--max-shard-size", SHARD])
    assert code == 0 and len(list((tmp_path / "export").glob("model-*.safetensors"))) >= 2
    assert "model.safetensors.index.json" in capsys.readouterr().out


def test_cli_errors_are_clear(verbs, full_run, qa_run, tmp_path, capsys):
    assert verbs(["merge", str(full_run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "tuneforge: error:" in err and "hint: write a standalone checkpoint" in err and "Traceback" not in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert verbs(["export", str(qa_run), "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_help_states_the_default_gaps(verbs, capsys):
    with pytest.raises(SystemExit):
        verbs(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(f"{dtype} {gap:g}" in help_text for dtype, gap in DEFAULT_MAX_LOGIT_GAP.items())
