import json

import pytest

from tests.conftest import successor_rows, write_jsonl
from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data import build_datasets, read_file, read_rows
from tuneforge.data.sources import BadRows
from tuneforge.errors import DataError


def test_csv_and_parquet_rows_with_origins(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "qa.csv").write_text('question,answer\n"a, quoted",1\nb,2\n', encoding="utf-8")
    rows = read_file(tmp_path / "qa.csv")
    assert [r.fields for r in rows] == [{"question": "a, quoted", "answer": "1"}, {"question": "b", "answer": "2"}]
    assert rows[1].origin.endswith("qa.csv:3")
    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "t.parquet")
    rows = read_file(tmp_path / "t.parquet")
    assert [r.fields["text"] for r in rows] == ["x", "y"] and rows[1].origin.endswith("t.parquet row 1")


def test_csv_row_with_extra_cells_is_located(tmp_path):
    (tmp_path / "bad.csv").write_text("question,answer\na,1,oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:2: row has 3 cells but the header has 2"):
        read_file(tmp_path / "bad.csv")


def test_hf_prefix_loads_through_datasets(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "local_hf"
    folder.mkdir()
    Dataset.from_dict({"question": ["q1", "q2"], "answer": ["a1", "a2"]}).to_parquet(str(folder / "train.parquet"))
    rows = read_rows(DatasetSpec(path=f"hf:{folder}", split="train"), "k")
    assert [r.fields["answer"] for r in rows] == ["a1", "a2"]
    with pytest.raises(DataError, match="cannot load dataset"):
        read_rows(DatasetSpec(path=f"hf:{tmp_path / 'missing'}"), "k")


def test_skip_bad_rows_counts_and_keeps_reasons(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n{"text": "fine"}\n[1]\n', encoding="utf-8")
    bad = BadRows(skip=True)
    rows = read_file(path, bad)
    assert [r.fields["text"] for r in rows] == ["ok", "fine"]
    assert bad.count == 2
    assert bad.reasons[0].startswith(f"{path}:2: malformed JSON")
    assert bad.reasons[1].startswith(f"{path}:4: expected a JSON object")


def test_json_array_jsonl_and_json_lines_named_json(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "lines.jsonl", rows)
    write_jsonl(tmp_path / "lines.json", rows)  # JGLUE ships JSON lines named .json
    for name in ("array.json", "lines.jsonl", "lines.json"):
        assert [r.fields for r in read_file(tmp_path / name)] == rows


def test_directory_and_glob_sources(tmp_path):
    write_jsonl(tmp_path / "partition_1.json", [{"text": "one"}])
    write_jsonl(tmp_path / "partition_2.json", [{"text": "two"}])
    by_glob = read_rows(DatasetSpec(path=str(tmp_path / "partition_*.json"), format="text"), "k")
    by_dir = read_rows(DatasetSpec(path=str(tmp_path), format="text"), "k")
    assert [r.fields["text"] for r in by_glob] == ["one", "two"] == [r.fields["text"] for r in by_dir]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError) as info:
        read_file(path)
    assert f"{path}:2" in str(info.value) and "malformed JSON" in str(info.value)


def test_missing_field_names_field_row_and_found_fields(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    config = DataConfig(datasets=[DatasetSpec(path=str(path))])  # defaults expect instruction/output
    with pytest.raises(DataError) as info:
        build_datasets(config, tokenizer, seed=0)
    text = str(info.value)
    assert f"{path}:1" in text
    assert "missing field 'instruction'" in text
    assert "answer, question" in text


def test_bad_encoding_is_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:1: not valid UTF-8"):
        read_file(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_rows(DatasetSpec(path=str(tmp_path / "nope.jsonl")), "k")


def test_eval_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", successor_rows(50))
    spec = DatasetSpec(path=str(path), prompt_fields=["question"], response_field="answer")
    config = DataConfig(datasets=[spec], eval_split=0.2, max_length=64)
    first = build_datasets(config, tokenizer, seed=1)
    again = build_datasets(config, tokenizer, seed=1)
    other = build_datasets(config, tokenizer, seed=2)
    assert len(first.eval) == 10 and len(first.train) == 40
    assert first.eval["input_ids"] == again.eval["input_ids"]
    assert first.eval["input_ids"] != other.eval["input_ids"]
    train_set = {tuple(x) for x in first.train["input_ids"]}
    assert not any(tuple(x) in train_set for x in first.eval["input_ids"])


def test_all_rows_dropped_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a very long question " * 20, "answer": "x"}])
    spec = DatasetSpec(path=str(path), prompt_fields=["question"], response_field="answer")
    with pytest.raises(DataError, match="no usable examples"):
        build_datasets(DataConfig(datasets=[spec], max_length=16), tokenizer, seed=0)


def test_title_and_content_text_format(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "news.jsonl", [{"title": "标题", "content": "内容"}])
    spec = DatasetSpec(path=str(path), format="text", text_fields=["title", "content"])
    data = build_datasets(DataConfig(datasets=[spec], max_length=64), tokenizer, seed=0)
    ids = data.train["input_ids"][0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "标题\n内容"
    assert data.train["labels"][0] == ids


@pytest.fixture
def rooted(tmp_path):
    """A data root holding one file, a secret file beside the root, and a link out of it."""
    root = tmp_path / "root"
    root.mkdir()
    write_jsonl(root / "train.jsonl", successor_rows(3))
    secret = tmp_path / "secret.jsonl"
    write_jsonl(secret, [{"question": "key", "answer": "hunter2"}])
    (root / "link.jsonl").symlink_to(secret)
    return root, secret


def spec_under(root, path):
    config = DataConfig(datasets=[{"path": path, "prompt_fields": ["question"], "response_field": "answer"}], root=str(root))
    return config.datasets[0]


def test_a_data_root_takes_relative_paths_from_it(rooted):
    root, _ = rooted
    rows = read_rows(spec_under(root, "train.jsonl"), "data.datasets[0]")
    assert [r.fields["question"] for r in rows] == [row["question"] for row in successor_rows(3)]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "glob"])
def test_data_paths_cannot_escape_the_root(rooted, how):
    root, secret = rooted
    path = {"dotdot": "../secret.jsonl", "absolute": str(secret), "symlink": "link.jsonl", "glob": "*.jsonl"}[how]
    with pytest.raises(DataError, match="leads outside the data root") as error:
        read_rows(spec_under(root, path), "data.datasets[0]")
    assert str(secret.resolve()) in str(error.value) and "hunter2" not in str(error.value)


def test_a_dataset_root_overrides_the_data_root(rooted, tmp_path):
    root, secret = rooted
    config = DataConfig(
        datasets=[{"path": "secret.jsonl", "root": str(tmp_path), "prompt_fields": ["question"], "response_field": "answer"}],
        root=str(root),
    )
    assert config.datasets[0].root == str(tmp_path)
    assert read_rows(config.datasets[0], "data.datasets[0]")[0].fields["answer"] == "hunter2"
