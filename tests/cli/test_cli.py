import shlex
from pathlib import Path

import pytest

from tuneforge import __version__
from tuneforge.cli.main import VERBS, build_parser, main
from tuneforge.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tuneforge {__version__}"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_shows_an_example_that_parses(verb, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    help_text = capsys.readouterr().out
    example = VERBS[verb].EXAMPLE
    assert f"example:\n  {example}" in help_text
    argv = shlex.split(example)
    assert argv[0] == "tuneforge"
    args = build_parser().parse_args(argv[1:])
    assert args.verb == verb
    if hasattr(args, "config"):  # the example's config and overrides are valid
        load_config(args.config, args.overrides)


def test_user_errors_print_without_traceback(tmp_path, capsys):
    code = main(["train", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "tuneforge: error:" in err and "config file not found" in err
    assert "Traceback" not in err


def test_bad_override_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = main(["train", "examples/quickstart.yaml", "train.learnig_rate=1"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'learning_rate'?" in err


def test_generate_from_a_saved_model_dir(tiny_model_dir, capsys):
    code = main(["generate", str(tiny_model_dir), "--raw", "--prompt", "hello", "--max-new-tokens", "3"])
    assert code == 0
    assert capsys.readouterr().out.strip() != ""
