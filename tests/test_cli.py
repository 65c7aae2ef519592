"""``upstream-proxy`` and ``./run.sh`` as a newcomer meets them: refusals come before any banner,
in one line without a traceback, and the help says what each flag does."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import pytest_upstream
from pytest_upstream.cli.main import build_parser, main
from pytest_upstream.repro.lockfile import LockFile, LockFileEntry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (no pyproject.toml: the built-in proxies), cache inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPSTREAM_PROXY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UPSTREAM_PROXY_MODE", raising=False)
    return tmp_path


def test_serve_refuses_workers_with_a_lock_before_printing_anything(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--workers", "2", "--lock", "x.lock"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no banner for a server that will not run
    assert err == (
        "upstream-proxy: error: --workers above 1 cannot write a lock: each process sees only some requests\n"
    )
    assert not (here / "cache").exists()


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_serve_refuses_a_bad_worker_count(
    here: Path, workers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--workers", workers])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "argument --workers" in err


@pytest.mark.parametrize("port", ["65536", "-1", "http"])
def test_serve_refuses_a_bad_port(here: Path, port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", port])
    assert info.value.code == 2
    assert "argument --port" in capsys.readouterr().err


def test_serve_on_a_port_in_use_names_the_port(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"upstream-proxy: error: port {port} on 127.0.0.1 is already in use (choose another --port, or 0)\n"
    )


def test_version_is_the_package_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_upstream", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout == f"upstream-proxy {pytest_upstream.__version__}\n"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == pytest_upstream.__version__


def test_create_source_has_help_and_defaults_to_custom_as_the_table_does(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create = next(
        action.choices["create"]
        for action in build_parser()._actions
        if isinstance(action.choices, dict) and "create" in action.choices
    )
    helps = {option: action.help for action in create._actions for option in action.option_strings}
    assert helps["--source"] and "custom" in helps["--source"]
    assert all(helps[option] for option in ("--url", "--format", "--auth"))

    config = here / "pyproject.toml"
    args = [
        "--config",
        str(config),
        "create",
        "internal",
        "--format",
        "pypi",
        "--url",
        "http://127.0.0.1:1/simple/",
    ]
    assert main(args) == 0
    assert tomllib.loads(config.read_text())["tool"]["pytest-upstream"]["proxy"][0]["source"] == "custom"
    assert main(["--config", str(config), "create", "nothing"]) == 2  # custom: format and url needed
    assert "a custom source needs 'format'" in capsys.readouterr().err


def test_lock_verify_counts_agree_with_their_nouns(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = here / "one.lock"
    LockFile([LockFileEntry("g", "a.bin", "", "0" * 64, 1, "artifact")]).save(lock)
    assert main(["lock", "verify", "--lock", str(lock)]) == 1
    out, err = capsys.readouterr()
    assert "(1 byte)" in out
    assert "1 of 1 entry missing or corrupt" in err


def test_run_sh_without_a_command_prints_only_its_usage() -> None:
    result = subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines[0].startswith("One entry point")
    assert [line.split()[1] for line in lines[1:]] == ["serve", "test", "fast"]
    assert "set -" not in result.stdout and "#" not in result.stdout


def test_serve_on_an_address_this_machine_lacks_is_one_line(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--host", "203.0.113.9"]) == 1  # TEST-NET-3: no interface has it
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("upstream-proxy: error: cannot listen on 203.0.113.9:0: ") and err.count("\n") == 1
