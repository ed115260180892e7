import json

import pytest

from tide.cli import main
from tide.prompts import BUILTIN_PROMPTS, Prompt, PromptFileError, load_prompts


def test_both_line_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "def f():"}) + "\n\n" + json.dumps({"turns": ["Hi", "more"]}) + "\n")
    assert load_prompts(f) == [Prompt("def f():", chat=False), Prompt("Hi", chat=True)]


def test_builtin_set_ships_with_the_package():
    assert BUILTIN_PROMPTS.is_file() and len(load_prompts("builtin")) >= 40


@pytest.mark.parametrize("text, message", [
    ("{not json\n", "p.jsonl:1: not valid JSON"),
    ('{"turns": []}\n', "expected"),
    ('{"prompt": 3}\n', "expected"),
    ("\n", "no prompts"),
])
def test_bad_files_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(PromptFileError, match=message):
        load_prompts(f)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text("oops\n")
    assert main(["bench", "--prompts", str(f), "--json", str(tmp_path / "o.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(f), "--json", "x", "decode.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
