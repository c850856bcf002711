"""What a hostile walk through the CLI found (issue 27): bad input exits 2 in one line,
outputs honour the umask, error hints that do not mislead, SIGTERM as a clean stop, a CLI
that answers without importing torch or Ray, the k8s README's offline dry run."""

from __future__ import annotations

import pytest

from fadrm.cli import main

# --------------------------------------------------------------------------- 3: exit codes


@pytest.mark.parametrize("text, words", [
    ("- name: a\n- name: b\n", "holds a list"),
    ("just a string\n", "holds a string"),
    ("name: [a\n", "invalid YAML: while parsing a flow sequence"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "cannot read the config: not a text file"),
])
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_config_file_that_is_not_a_mapping_is_bad_input(tmp_path, capsys, text, words,
                                                         command):
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    assert main([command, str(path), "--executor", "local"] if command == "run"
                else [command, str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {path}: ") and words in err[-1], err
    assert len(err) == 2 and err[0] == f"config: file {path}"  # one line of error, no advice


@pytest.mark.parametrize("command", ["run", "status"])
def test_a_malformed_set_value_is_bad_input_naming_the_override(tmp_path, capsys, command):
    out = f"output={tmp_path / 'out'}"
    assert main([command, "demo", "--set", out, "--set", "recover.resolutions=[32,32"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: recover.resolutions: --set 'recover.resolutions=[32,32'"
                              ": the value is not valid YAML"), err
    assert "ParserError" not in err[-1] and "resume" not in err[-1] and len(err) == 2
