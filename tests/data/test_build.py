"""Mixtures, bad-row skipping, the tokenisation cache and streaming."""

import pytest

from tests.conftest import build_tokenizer, successor_rows, write_jsonl
from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data import build, build_datasets
from tuneforge.data.cache import cache_key
from tuneforge.errors import DataError


def qa_spec(path, **extra) -> DatasetSpec:
    return DatasetSpec(path=str(path), prompt_fields=["question"], response_field="answer", template="qa", **extra)


def test_mixture_by_samples_and_weight_is_seeded(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", successor_rows(30))
    b = write_jsonl(tmp_path / "b.jsonl", successor_rows(10, start=500))
    c = write_jsonl(tmp_path / "c.jsonl", successor_rows(20, start=900))
    config = DataConfig(
        datasets=[qa_spec(a, weight=1.0), qa_spec(b, weight=3.0), qa_spec(c, samples=45)], max_length=64
    )
    first = build_datasets(config, tokenizer, seed=3, use_cache=False)
    assert [s.used for s in first.stats] == [10, 30, 45]  # weighted: 40 examples shared 1:3
    assert len(first.train) == 85
    again = build_datasets(config, tokenizer, seed=3, use_cache=False)
    other = build_datasets(config, tokenizer, seed=4, use_cache=False)
    assert first.train["input_ids"] == again.train["input_ids"]
    assert first.train["input_ids"] != other.train["input_ids"]
    # b has 10 rows and must supply 30: each row exactly three times.
    b_ids = {tuple(x) for x in build_datasets(DataConfig(datasets=[qa_spec(b)], max_length=64), tokenizer, 0, use_cache=False).train["input_ids"]}
    from collections import Counter

    counts = Counter(tuple(x) for x in first.train["input_ids"] if tuple(x) in b_ids)
    assert set(counts.values()) == {3} and len(counts) == 10


def test_bad_rows_are_skipped_with_count_or_fail_by_default(tmp_path, tokenizer):
    rows = successor_rows(5) + [{"question": "no answer here"}, {"question": ["a", "list"], "answer": "x"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match=r"qa\.jsonl:6: .*missing field 'answer'"):
        build_datasets(DataConfig(datasets=[qa_spec(path)], max_length=64), tokenizer, 0, use_cache=False)
    data = build_datasets(DataConfig(datasets=[qa_spec(path)], max_length=64, on_bad_rows="skip"), tokenizer, 0, use_cache=False)
    assert len(data.train) == 5
    assert data.stats[0].bad_rows == 2
    assert "qa.jsonl:6" in data.stats[0].bad_reasons[0]
    assert "2 bad rows skipped" in data.stats[0].describe()


def test_second_build_reuses_the_cache_without_tokenising(tmp_path, tokenizer, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "qa.jsonl", successor_rows(20))
    config = DataConfig(datasets=[qa_spec(path)], max_length=64, eval_split=0.2, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(config, tokenizer, seed=0)
    assert not first.from_cache

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(build, "tokenize_dataset", no_tokenising)
    second = build_datasets(config, tokenizer, seed=0)
    assert second.from_cache
    assert "reusing tokenised data from cache" in capsys.readouterr().out
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.eval["labels"] == first.eval["labels"]
    assert second.stats[0].trained_tokens == first.stats[0].trained_tokens


def test_a_cache_entry_another_node_renames_in_first_is_kept(tmp_path, tokenizer, monkeypatch):
    """Two nodes' rank 0 on one shared filesystem fill the same entry: the second's rename met the
    first's directory ("Directory not empty") after it had checked that none was there."""
    from pathlib import Path

    from datasets import Dataset

    from tuneforge.data.cache import DataCache

    path = write_jsonl(tmp_path / "qa.jsonl", successor_rows(4))
    config = DataConfig(datasets=[qa_spec(path)], max_length=64, cache_dir=str(tmp_path / "cache"))
    cache = DataCache(config, tokenizer, seed=0)
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    cache.save(rows, None, {"by": "the first node"})
    real_exists = Path.exists
    # The check ran before the first node's rename landed.
    monkeypatch.setattr(Path, "exists", lambda path: False if path == cache.path else real_exists(path))
    cache.save(Dataset.from_dict({"input_ids": [[9]]}), None, {"by": "the second node"})
    monkeypatch.undo()
    train, _, meta = cache.load()
    assert meta == {"by": "the first node"} and train["input_ids"] == [[1, 2, 3]]
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.key]  # no staging left behind


def test_cache_key_changes_with_tokenizer_data_and_settings(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", successor_rows(5))
    config = DataConfig(datasets=[qa_spec(path)], max_length=64)
    key = cache_key(config, tokenizer, 0)
    assert cache_key(config, tokenizer, 0) == key
    assert cache_key(config.model_copy(update={"num_proc": 4}), tokenizer, 0) == key  # no effect on result
    from transformers import AutoTokenizer

    other_tokenizer = AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path / "other", vocab_size=500)))
    assert cache_key(config, other_tokenizer, 0) != key  # only the tokenizer changed (PITFALLS 6)
    assert cache_key(config.model_copy(update={"max_length": 32}), tokenizer, 0) != key
    assert cache_key(config.model_copy(update={"packing": True}), tokenizer, 0) != key
    assert cache_key(config, tokenizer, 1) != key
    write_jsonl(path, successor_rows(5, start=1))
    assert cache_key(config, tokenizer, 0) != key


def test_parallel_tokenisation_equals_serial(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", successor_rows(40))
    serial = build_datasets(DataConfig(datasets=[qa_spec(path)], max_length=64), tokenizer, 0, use_cache=False)
    parallel = build_datasets(DataConfig(datasets=[qa_spec(path)], max_length=64, num_proc=2), tokenizer, 0, use_cache=False)
    assert parallel.train["input_ids"] == serial.train["input_ids"]
    assert parallel.train["labels"] == serial.train["labels"]


def test_streaming_text_blocks_match_the_in_memory_blocks(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"title": f"t{i}", "content": "本文 " * i} for i in range(12)])
    spec = DatasetSpec(path=str(path), format="text", text_fields=["title", "content"])
    in_memory = build_datasets(DataConfig(datasets=[spec], max_length=16), tokenizer, 0, use_cache=False)
    streamed = build_datasets(DataConfig(datasets=[spec], max_length=16, streaming=True), tokenizer, 0)
    blocks = [row["input_ids"] for row in streamed.train]
    assert blocks == in_memory.train["input_ids"]


def test_streaming_refuses_supervised_formats(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", successor_rows(3))
    with pytest.raises(DataError, match="streaming reads local text-format files only"):
        build_datasets(DataConfig(datasets=[qa_spec(path)], streaming=True), tokenizer, 0)


def test_csv_row_with_extra_cells_is_skipped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nafter 1,2\nbroken,3,extra\nafter 5,6\n", encoding="utf-8")
    config = DataConfig(datasets=[qa_spec(path)], max_length=64, on_bad_rows="skip")
    stats = build_datasets(config, tokenizer, 0, use_cache=False).stats[0]
    assert (stats.rows, stats.examples, stats.bad_rows) == (3, 2, 1)  # every line counted once
    assert "qa.csv:3: row has 3 cells" in stats.bad_reasons[0]


def test_template_errors_name_the_dataset(tmp_path, tokenizer):
    from tuneforge.errors import ConfigError

    path = write_jsonl(tmp_path / "qa.jsonl", successor_rows(3))
    spec = DatasetSpec(path=str(path), prompt_fields=["question"], response_field="answer", template="chatml")
    with pytest.raises(ConfigError, match=r"data\.datasets\.0\.template=chatml"):
        build_datasets(DataConfig(datasets=[spec]), tokenizer, 0, use_cache=False)


def test_streaming_refuses_settings_it_cannot_apply(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}])
    spec = DatasetSpec(path=str(path), format="text", max_rows=5)
    with pytest.raises(DataError, match=r"cannot apply: data\.datasets\.0\.max_rows, data\.eval_split"):
        build_datasets(DataConfig(datasets=[spec], streaming=True, eval_split=0.1), tokenizer, 0)
