"""A user's own model class, given by `_target_`, trains, saves and reloads like a built-in."""

import sys
import textwrap

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import successor_rows, write_jsonl
from tests.models.custom_code import CONFIGURATION, LAYERS, MODELING
from tuneforge import train
from tuneforge.infer import load_for_inference

BUILDER = '''
def build(vocab_size, hidden_size=16):
    return TinyCustomForCausalLM(TinyCustomConfig(vocab_size=vocab_size, hidden_size=hidden_size))
'''


class LogitsAtEnd(TrainerCallback):
    def __init__(self):
        self.logits = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            self.logits = model.eval()(input_ids=torch.tensor([[1, 5, 9]])).logits.clone()


def test_builder_model_trains_saves_and_reloads(tmp_path, monkeypatch, tokenizer_dir, tokenizer):
    # One user module: the three files of tests/models/custom_code.py without relative imports.
    code = "\n".join(
        textwrap.dedent(part).replace("from .configuration_tiny_custom import TinyCustomConfig", "")
        .replace("from .layers_tiny_custom import GatedMix", "")
        for part in (CONFIGURATION, LAYERS, MODELING, BUILDER)
    )
    (tmp_path / "my_models.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(16))
    live = LogitsAtEnd()
    result = train(
        {
            "model": {"path": str(tokenizer_dir), "builder": {"_target_": "my_models.build", "vocab_size": len(tokenizer)}},
            "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer", "template": "qa"}], "max_length": 32},
            "train": {"max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True},
            "output": {"dir": str(tmp_path / "run")},
        },
        callbacks=[live],
    )
    assert result.tokens_seen > 0
    # Saved as a standard checkpoint; reloads through the Auto classes once the class is known.
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model_dir)).eval()
    assert type(reloaded).__name__ == "TinyCustomForCausalLM"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=torch.tensor([[1, 5, 9]])).logits, live.logits)
    # A fresh process would not know the class: the run names it, and generate imports it.
    sys.modules.pop("my_models", None)
    loaded = load_for_inference(str(result.run_dir), device="cpu")
    assert type(loaded.model).__name__ == "TinyCustomForCausalLM"
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(input_ids=torch.tensor([[1, 5, 9]])).logits, live.logits)
