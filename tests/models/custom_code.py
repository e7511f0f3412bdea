"""Writes a checkpoint directory whose model is custom code, like Tanuki-8x8B (seed 004).

Three files import each other relatively (`from .configuration_... import`), which is what
breaks in tools that import such files as top-level modules.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny_custom"

    def __init__(self, vocab_size=64, hidden_size=16, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''

LAYERS = '''
import torch


class GatedMix(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.proj = torch.nn.Linear(size, 2 * size)

    def forward(self, hidden):
        value, gate = self.proj(hidden).chunk(2, dim=-1)
        return hidden + value * torch.sigmoid(gate)
'''

MODELING = '''
import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tiny_custom import TinyCustomConfig
from .layers_tiny_custom import GatedMix


class TinyCustomForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = GatedMix(config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        logits = self.head(self.mix(self.embed(input_ids)))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)
'''


def write_custom_checkpoint(directory: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configuration_tiny_custom.py").write_text(textwrap.dedent(CONFIGURATION))
    (directory / "layers_tiny_custom.py").write_text(textwrap.dedent(LAYERS))
    (directory / "modeling_tiny_custom.py").write_text(textwrap.dedent(MODELING))
    config = {
        "model_type": "tiny_custom",
        "architectures": ["TinyCustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
        },
        "vocab_size": vocab_size,
        "hidden_size": 16,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for item in tokenizer_dir.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    return directory
