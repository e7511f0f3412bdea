"""`tuneforge chat`: history kept across turns and rendered with the run's template, from a pipe too."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from tests.infer.test_generation import run_config
from tuneforge.cli.main import main
from tuneforge.data.templates import render
from tuneforge.errors import ModelError
from tuneforge.infer import load_for_inference
from tuneforge.infer.chat import ChatSession
from tuneforge.train import train

TURN = re.compile(r"\[prompt\]\n(.*?)\n\[/prompt\]\n(.*?)\n", re.DOTALL)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    return train(run_config(tmp_path_factory.mktemp("chat"), tiny_model_dir, {"name": "full"})).run_dir


def test_chat_through_a_pipe_keeps_history_rendered_with_the_template(run):
    turns = "after 3\nafter 4\n/reset\nafter 5\n/exit\nafter 6\n"
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli.main", "chat", str(run), "--show-prompt", "--no-stream", "--max-new-tokens", "6"],
        input=turns, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(history cleared)" in proc.stdout
    (first_prompt, first), (second_prompt, _), (third_prompt, _) = TURN.findall(proc.stdout)  # nothing after /exit
    assert first.strip()  # the model answered something: the history below holds a real reply
    loaded = load_for_inference(str(run))
    history = [
        {"role": "user", "content": "after 3"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "after 4"},
    ]
    expected = render(loaded.tokenizer, loaded.template, history, add_generation_prompt=True)
    assert second_prompt == expected
    assert second_prompt.startswith(first_prompt + first + loaded.tokenizer.eos_token)  # the first turn, as trained
    # After /reset the conversation starts again.
    assert third_prompt == render(loaded.tokenizer, loaded.template, [{"role": "user", "content": "after 5"}],
                                  add_generation_prompt=True)


def test_streamed_chat_from_stdin_prints_the_replies_the_session_gives(run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("after 3\n\nafter 4\n"))  # blank lines are skipped
    assert main(["chat", str(run), "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out.splitlines()
    session = ChatSession(load_for_inference(str(run)), max_new_tokens=6)
    assert streamed == [session.send("after 3"), session.send("after 4")]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_a_system_prompt_leads_the_history_and_survives_reset(run):
    session = ChatSession(load_for_inference(str(run)), system_prompt="Answer in digits.", max_new_tokens=4)
    session.send("after 3")
    assert session.prompt_text().startswith("<s>Answer in digits.\n\n### Question:\nafter 3")
    session.reset()
    assert session.messages == [{"role": "system", "content": "Answer in digits."}]


def test_history_beyond_the_context_window_drops_the_oldest_exchanges(run):
    loaded = load_for_inference(str(run))
    context = loaded.model.config.max_position_embeddings
    reply_room = context - 40  # 40 tokens of prompt: about two exchanges of this data
    session = ChatSession(loaded, system_prompt="Answer in digits.", max_new_tokens=reply_room)
    for n in range(3, 9):
        session.ask(f"after {n}")
        assert len(session._prompt_ids(session.messages)) <= context - reply_room
        session.messages.append({"role": "assistant", "content": str(n + 1)})
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert session.messages[0] == {"role": "system", "content": "Answer in digits."}  # the system prompt stays
    assert users[-1] == "after 8" and "after 3" not in users and len(users) < 6  # oldest first to go
    assert session.dropped_turns >= 1
    # Kept exchanges are whole: each user turn is followed by its reply.
    roles = [m["role"] for m in session.messages[1:]]
    assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(run, monkeypatch, capsys):
    loaded = load_for_inference(str(run))
    context = loaded.model.config.max_position_embeddings
    session = ChatSession(loaded, max_new_tokens=4)
    session.send("after 3")
    before = list(session.messages)
    with pytest.raises(ModelError, match=f"the model's context holds {context}") as error:
        session.ask("after " * context)
    assert "lower --max-new-tokens" in error.value.hint
    assert session.messages == before  # the conversation is as it was
    monkeypatch.setattr(sys, "stdin", io.StringIO("after " * context + "\nafter 4\n"))
    assert main(["chat", str(run), "--max-new-tokens", "4", "--no-stream"]) == 0
    captured = capsys.readouterr()
    assert "the model's context holds" in captured.err and len(captured.out.strip().splitlines()) == 1
