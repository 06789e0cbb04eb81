"""The edge credential from a file (`--token-file`), kept out of the process list."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.cli import build_parser, main
from edge.cli import agent_settings


def _args(*argv: str) -> object:
    return build_parser().parse_args(["edge", "--edge-id", "site_a", *argv])


def test_the_credential_is_read_from_the_file_and_wins_over_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "edge.token"
    path.write_text("eyJhbGciOi.payload.sig\n")
    settings = agent_settings(_args("--token", "ignored", "--token-file", str(path)), env={})
    assert settings.token == "eyJhbGciOi.payload.sig"
    by_variable = agent_settings(_args(), env={"DISPATCH_EDGE_TOKEN_FILE": str(path)})
    assert by_variable.token == "eyJhbGciOi.payload.sig"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read it"),
        ("", "holds nothing"),
        ("token one\ntoken two\n", "holds more than one word"),
    ],
)
def test_an_unusable_file_stops_the_agent_naming_the_file_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, says: str
) -> None:
    path = tmp_path / "edge.token"
    if content is not None:
        path.write_text(content)
    code = main(["edge", "--edge-id", "site_a", "--token-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--token-file {path}" in err and says in err, err
    assert "dispatch token --edge EDGE" in err, err
