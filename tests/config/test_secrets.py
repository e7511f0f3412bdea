from tuneforge.config import dump_config, load_config
from tuneforge.config.secrets import REDACTED, redact


def test_secret_keys_and_values_are_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value-1234567890")
    data = {
        "hub_token": "anything",
        "nested": {"api_key": "x", "note": "uses wandb-secret-value-1234567890 inside"},
        "plain": "hf_" + "a" * 34,
        "special_tokens": ["<tool>"],
        "max_new_tokens": 8,
        "harmless": "hello",
    }
    cleaned = redact(data)
    assert cleaned["hub_token"] == REDACTED and cleaned["nested"]["api_key"] == REDACTED
    assert cleaned["nested"]["note"] == REDACTED and cleaned["plain"] == REDACTED
    assert cleaned["special_tokens"] == ["<tool>"] and cleaned["max_new_tokens"] == 8
    assert cleaned["harmless"] == "hello"


def test_resolved_config_never_shows_the_hub_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "b" * 34)
    config = load_config(
        {
            "model": {"path": "m", "new_special_tokens": ["<x>"]},
            "data": {"datasets": [{"path": "x.jsonl", "system_prompt": "token hf_" + "b" * 34}]},
            "train": {"hub_token": "hf_" + "c" * 34, "report_to": "none"},
        }
    )
    text = dump_config(config)
    assert "hf_" not in text
    assert "hub_token: '***'" in text
    assert "<x>" in text
