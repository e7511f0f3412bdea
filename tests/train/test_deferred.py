"""Values the host reads from the GPU without waiting for the kernels queued after them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

from tuneforge.train.deferred import DeferredValue
from tuneforge.train.trainer import TokensCountedAheadMixin

PAD = 0


def test_a_deferred_value_reads_tensors_and_numbers_on_the_cpu():
    assert DeferredValue.of(torch.tensor(7)).get().item() == 7
    assert DeferredValue.of(12).get().item() == 12
    assert torch.equal(DeferredValue.of(torch.tensor([1.5, 2.0])).get(), torch.tensor([1.5, 2.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reading_a_deferred_value_leaves_the_work_queued_after_it_running():
    value = torch.arange(10, device="cuda").sum()
    deferred = DeferredValue.of(value)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(50):  # about 10 ms of matmuls queued behind the copy
        big = big @ big / 64
    assert deferred.get().item() == 45
    assert not torch.cuda.current_stream().query(), "the read waited for the matmuls"
    torch.cuda.synchronize()


class CountingLM(nn.Module):
    """Records, at each forward, whether the token count was already queued."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)
        self.trainer: Trainer | None = None
        self.counted_before_forward: list[bool] = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        if self.trainer is not None and isinstance(self.trainer, TokensCountedAheadMixin):
            self.counted_before_forward.append(self.trainer._tokens_ahead is not None)
        logits = self.head(self.embed(input_ids))
        return {"loss": nn.functional.cross_entropy(logits.view(-1, 16), labels.view(-1), ignore_index=-100)}


class CountsAhead(TokensCountedAheadMixin, Trainer):
    pass


def padded_rows() -> list[dict[str, torch.Tensor]]:
    rows = []
    for length in (3, 5, 2, 6, 4, 6):
        ids = torch.tensor([PAD] * (6 - length) + list(range(1, length + 1)))
        mask = (ids != PAD).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


@pytest.mark.parametrize("mode", ["non_padding", "all"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_tokens_counted_ahead_equal_the_trainers_own_count(tmp_path, mode, with_mask):
    """The count is queued before the forward and equals what `Trainer._track_num_input_tokens`
    counts: real tokens from the attention mask or the pad id, or every token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "x": 1}, unk_token="x")), pad_token="<pad>")
    data = [row if with_mask else {k: v for k, v in row.items() if k != "attention_mask"} for row in padded_rows()]
    seen = {}
    for trainer_class in (Trainer, CountsAhead):
        torch.manual_seed(0)
        model = CountingLM()
        args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=2, max_steps=3,
                                 include_num_input_tokens_seen=mode, report_to="none", use_cpu=True, save_strategy="no",
                                 disable_tqdm=True)
        # The default collator: a padding collator would add an all-ones mask.
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                data_collator=default_data_collator)
        model.trainer = trainer
        trainer.train()
        seen[trainer_class] = trainer.state.num_input_tokens_seen
        if trainer_class is CountsAhead:
            assert model.counted_before_forward == [True, True, True]
    expected = sum(len(r["input_ids"]) if mode == "all" else int((r["input_ids"] != PAD).sum()) for r in padded_rows())
    assert seen[Trainer] == seen[CountsAhead] == expected
