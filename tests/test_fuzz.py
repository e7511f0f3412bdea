"""Fuzzing the user-input boundary: every input gives a valid result or a `TuneforgeError`.

Data readers, row formats, templates and the config loader take what users write. Whatever
they are given, they must answer with a result or a tuneforge error with a message (the CLI
prints those without a traceback), never another exception. The examples are derandomized,
so a run is reproducible and a failure reappears on every run:

    pytest tests/test_fuzz.py -rP      # -rP prints the per-target case counts

Any other exception fails its target. Each crash found so far keeps a `test_crash_*`
reproducer with its minimal input at the end of this file.
"""

from __future__ import annotations

import json
import string
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.config.loading import load_config
from tuneforge.config.schema import Config, DatasetSpec
from tuneforge.data.formats import (
    ROLE_NAMES,
    parse_multiple_choice,
    parse_preference,
    row_to_messages,
)
from tuneforge.data.sources import Row, read_file
from tuneforge.data.templates import (
    IGNORE_INDEX,
    Template,
    encode_conversation,
    resolve_template,
)
from tuneforge.errors import TuneforgeError

settings.register_profile(
    "tuneforge-fuzz",
    derandomize=True,  # the same examples on every run and machine
    max_examples=400,
    deadline=None,  # 2 shared CPU cores: timings vary too much to judge
    database=None,  # nothing read from or written to .hypothesis/
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)
# Applied per test, not loaded globally: other hypothesis tests keep their own settings.
FUZZ = settings(settings.get_profile("tuneforge-fuzz"))

CASES: dict[str, Counter[str]] = defaultdict(Counter)


def outcome(target: str, call: Callable[[], Any]) -> Any:
    """Run `call`; count it; a `TuneforgeError` must carry a message, anything else fails the test."""
    try:
        result = call()
    except TuneforgeError as error:
        assert error.message.strip() and str(error).strip(), f"{type(error).__name__} with an empty message"
        CASES[target]["error"] += 1
        return None
    CASES[target]["ok"] += 1
    return result


def fuzz(target: str, strategy: st.SearchStrategy[Any], call: Callable[[Any], Any], check: Callable[[Any], None] | None = None) -> None:
    """Run `call` on `FUZZ`'s examples of `strategy`; check each valid result."""

    @FUZZ
    @given(strategy)
    def run(value: Any) -> None:
        result = outcome(target, lambda: call(value))
        if result is not None and check is not None:
            check(result)

    run()


# --- strategies -------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


file_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    json_values.map(lambda v: json_text(v).encode("utf-8")),
    st.lists(json_values.map(json_text), max_size=5).map(lambda lines: "\n".join(lines).encode("utf-8")),
    st.lists(st.lists(st.text(alphabet=string.printable + "é\"", max_size=8), max_size=4), max_size=5).map(
        lambda table: "\n".join(",".join(cells) for cells in table).encode("utf-8")
    ),
)

FIELD_NAMES = [
    "instruction", "input", "output", "question", "answer", "prompt", "chosen", "rejected",
    "messages", "conversations", "choices", "choice0", "choice1", "choice2", "label", "text",
]
turn = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from([*ROLE_NAMES, "tool"]) | st.text(max_size=6), "content": json_scalars}),
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "Human", "GPT"]) | json_scalars, "value": json_scalars}),
    st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), json_scalars, max_size=3),
    json_scalars,
)
field_value = st.one_of(json_scalars, st.lists(turn, max_size=4), json_values, st.text(alphabet="0123456789 ²٣-", max_size=4))
valid_turns = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(list(ROLE_NAMES)), "content": st.text(max_size=10)}), min_size=1, max_size=4
)
short_text = st.text(max_size=10) | st.sampled_from(["a", " ", "0"])
# Rows close to valid for each format, so the fuzzing reaches past the first missing field.
plausible_rows = st.fixed_dictionaries(
    {},
    optional={
        "instruction": short_text, "input": short_text, "output": short_text, "question": short_text,
        "prompt": short_text | valid_turns, "chosen": short_text | valid_turns, "rejected": short_text | valid_turns,
        "messages": valid_turns, "choices": st.lists(short_text | json_scalars, max_size=4),
        "choice0": short_text, "choice1": short_text,
        "label": st.integers(-1, 4) | st.floats(-1, 4) | st.text(alphabet="0123456789 ²٣-", max_size=3),
    },
)
rows = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), field_value, max_size=6) | plausible_rows


def spec_for(data_format: str, **extra: Any) -> DatasetSpec:
    return DatasetSpec(path="fuzz.jsonl", format=data_format, **extra)


SPECS = {
    "instruction": spec_for("instruction"),
    "chat": spec_for("chat", system_prompt="be brief"),
    "multiple_choice": spec_for("multiple_choice"),
    "preference": spec_for("preference"),
}

messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=30)}),
    max_size=6,
)
# Text with the characters templates are made of, so some strings parse as Jinja.
JINJA_PIECES = [
    "{{ bos_token }}", "{{ eos_token }}", "{% for message in messages %}", "{% endfor %}",
    "{{ message['content'] }}", "{{ message['role'] }}", "{% if add_generation_prompt %}", "{% endif %}",
    "{% if message['role'] == 'assistant' %}", "{% else %}", "{{ messages[0]['content'] }}", "{prompt}",
    "<s>", "</s>", "\n", "### Answer:\n", "{{", "}}", "{%", "%}", "{{ 1 / 0 }}", "{{ x.y }}",
]
template_texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["auto", "tokenizer", "qa", "alpaca", "chatml", "llama-3", "plain", "{prompt}"]),
    st.lists(st.sampled_from(JINJA_PIECES) | st.text(max_size=5), max_size=10).map("".join),
)

SECTION_KEYS = {
    "model": ["path", "init", "dtype", "tokenizer", "builder", "trust_remote_code", "new_special_tokens"],
    "data": ["datasets", "eval_split", "max_length", "packing", "on_bad_rows", "eval_datasets"],
    "method": ["name", "r", "lora_alpha", "trainable", "qat"],
    "train": ["learning_rate", "max_steps", "per_device_train_batch_size", "learnig_rate", "seed"],
    "output": ["dir", "samples", "save_total_limit"],
}
config_values = st.deferred(
    lambda: json_scalars
    | st.lists(config_values, max_size=3)
    | st.dictionaries(st.sampled_from(["path", "format", "name", "_target_", "r"]) | st.text(max_size=5), config_values, max_size=3)
)
sections = st.fixed_dictionaries(
    {},
    optional={
        section: st.dictionaries(st.sampled_from(keys) | st.text(max_size=5), config_values, max_size=4)
        | config_values
        for section, keys in SECTION_KEYS.items()
    },
)
VALID_BASE = {"model": {"path": "tiny"}, "data": {"datasets": [{"path": "train.jsonl"}]}}


def _with(base: dict[str, Any], section: str, key: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(base))
    if isinstance(data.get(section), dict):
        data[section][key] = value
    else:
        data[section] = value
    return data


# A valid config with one key changed (or a section replaced), or added sections.
near_valid = st.builds(
    _with,
    st.just(VALID_BASE),
    st.sampled_from([*SECTION_KEYS, "extends"]),
    st.sampled_from([k for keys in SECTION_KEYS.values() for k in keys]),
    config_values,
) | sections.map(lambda extra: {**VALID_BASE, **extra})
yaml_texts = st.one_of(
    st.text(max_size=120),
    (sections | near_valid).map(lambda data: yaml.safe_dump(data, allow_unicode=True)),
    json_values.map(lambda data: yaml.safe_dump(data, allow_unicode=True)),
)
KEY_PATHS = [
    "train.learning_rate", "train.max_steps", "train.seed", "model.path", "model.init", "model.dtype",
    "data.max_length", "data.packing", "data.datasets.0.format", "data.datasets.0.template",
    "data.datasets.0.path", "method.name", "method.r", "output.dir", "output",
]
override_texts = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda key, value: f"{key}={value}",
        st.sampled_from(KEY_PATHS),
        st.sampled_from(["1e-4", "3", "-1", "lora", "full", "random", "true", "null", "[a]", "{r: 8}", "qa", ""])
        | st.text(max_size=8),
    ),
    st.builds(
        lambda section, key, value: f"{section}.{key}={value}",
        st.sampled_from([*SECTION_KEYS, "data.datasets.0", "data.datasets.9"]) | st.text(max_size=4),
        st.sampled_from([k for keys in SECTION_KEYS.values() for k in keys]) | st.text(max_size=4),
        st.text(max_size=12) | st.sampled_from(["null", "1e-4", "[a, b]", "{r: 8}", "true", "x: [", "inf"]),
    ),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- data readers -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_read_file_on_arbitrary_bytes(fuzz_dir, suffix):
    path = fuzz_dir / f"data{suffix}"

    def call(content: bytes) -> list[Row]:
        path.write_bytes(content)
        return read_file(path)

    def check(result: list[Row]) -> None:
        assert all(isinstance(row, Row) and isinstance(row.fields, dict) for row in result)
        assert all(row.origin.startswith(str(path)) for row in result)

    fuzz(f"read_file[{suffix}]", file_bytes, call, check)


# --- formats ----------------------------------------------------------------------------


def _check_messages(result: list[dict[str, str]]) -> None:
    assert result and all(set(m) == {"role", "content"} for m in result)
    assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in result)
    assert any(m["role"] == "assistant" for m in result)


@pytest.mark.parametrize("data_format", ["instruction", "chat", "multiple_choice"])
def test_row_to_messages_on_arbitrary_rows(data_format):
    spec = SPECS[data_format]
    fuzz(f"row_to_messages[{data_format}]", rows, lambda fields: row_to_messages(Row(fields, "fuzz.jsonl:1"), spec), _check_messages)


def test_parse_preference_on_arbitrary_rows():
    def check(result: Any) -> None:
        assert result.chosen != result.rejected
        assert result.chosen[-1]["role"] == result.rejected[-1]["role"] == "assistant"

    fuzz("parse_preference", rows, lambda fields: parse_preference(Row(fields, "fuzz.jsonl:1"), SPECS["preference"]), check)


def test_parse_multiple_choice_on_arbitrary_rows():
    def check(result: Any) -> None:
        assert len(result.choices) >= 2 and 0 <= result.label < len(result.choices)

    spec = SPECS["multiple_choice"]
    fuzz("parse_multiple_choice", rows, lambda fields: parse_multiple_choice(Row(fields, "fuzz.jsonl:1"), spec), check)


# --- templates --------------------------------------------------------------------------


def test_resolve_template_on_arbitrary_strings(tokenizer):
    def check(result: Template) -> None:
        assert result.chat_template and isinstance(result.end_of_turn_id(tokenizer), int)

    fuzz("resolve_template", template_texts, lambda text: resolve_template(text, tokenizer), check)


@pytest.fixture(scope="module")
def fuzz_templates(tokenizer) -> list[Template]:
    return [resolve_template(name, tokenizer) for name in ("qa", "alpaca", "plain", "Q: {prompt}\nA: ")]


def test_encode_conversation_on_arbitrary_messages(tokenizer, fuzz_templates):
    cases = st.tuples(messages, st.sampled_from(fuzz_templates), st.sampled_from(["all_assistant", "last_assistant"]))

    def call(case: tuple[Any, Template, Any]) -> tuple[list[int], list[int]]:
        conversation, template, train_on = case
        return encode_conversation(tokenizer, template, conversation, train_on=train_on)

    def check(result: tuple[list[int], list[int]]) -> None:
        input_ids, labels = result
        assert len(input_ids) == len(labels) and IGNORE_INDEX in labels
        assert any(label != IGNORE_INDEX for label in labels)
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, input_ids))

    fuzz("encode_conversation", cases, call, check)


# --- config loader ----------------------------------------------------------------------


def _check_config(result: Config) -> None:
    assert isinstance(result, Config) and result.output.dir


def test_load_config_on_arbitrary_yaml(fuzz_dir):
    path = fuzz_dir / "config.yaml"

    def call(text: str) -> Config:
        path.write_text(text, encoding="utf-8")
        return load_config(path)

    fuzz("load_config[yaml]", yaml_texts, call, _check_config)


@pytest.fixture(scope="module")
def valid_config(fuzz_dir) -> Path:
    path = fuzz_dir / "valid.yaml"
    path.write_text(
        "model: {path: tiny}\n"
        "data: {datasets: [{path: train.jsonl, prompt_fields: [question], response_field: answer}]}\n"
        "train: {max_steps: 2}\n",
        encoding="utf-8",
    )
    load_config(path)  # the base itself is valid: every error below comes from an override
    return path


def test_load_config_on_arbitrary_overrides(valid_config):
    fuzz(
        "load_config[overrides]", st.lists(override_texts, min_size=1, max_size=3),
        lambda overrides: load_config(valid_config, overrides), _check_config,
    )


# --- crashes the fuzzing found, fixed: the minimal inputs stay as regression tests -------------------------


def test_crash_multiple_choice_superscript_label():
    row = Row({"question": "0", "choice0": "", "choice1": "", "label": "²"}, "fuzz.jsonl:1")
    with pytest.raises(TuneforgeError):
        parse_multiple_choice(row, SPECS["multiple_choice"])


def test_crash_resolve_template_zero_division(tokenizer):
    with pytest.raises(TuneforgeError):
        resolve_template("{{0/0}}", tokenizer)


def test_crash_load_config_empty_output_dir(valid_config):
    """`output.dir=` would make the current directory the run directory."""
    with pytest.raises(TuneforgeError, match="output.dir"):
        load_config(valid_config, ["output.dir="])
    # `output.dir=#` is YAML's null (a comment): the default run directory, as when it is absent.
    assert load_config(valid_config, ["output.dir=#"]).output.dir == "runs/valid"


def test_crash_load_config_null_output(fuzz_dir):
    path = fuzz_dir / "null_output.yaml"
    path.write_text("0:\noutput:\n", encoding="utf-8")
    with pytest.raises(TuneforgeError):
        load_config(path)


def test_fuzz_counts():
    """Print how many cases each target ran (shown with -rP); ran in file order, so last."""
    if not CASES:
        pytest.skip("run with the fuzz targets above to count their cases")
    for target, counts in sorted(CASES.items()):
        print(
            f"{target}: {sum(counts.values())} cases ({counts['ok']} valid results, "
            f"{counts['error']} tuneforge errors, none crashed)"
        )
    assert all(sum(counts.values()) > 0 for counts in CASES.values())
