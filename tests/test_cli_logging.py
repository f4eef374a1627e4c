"""One logging setup for every command: -v / -q on the group, logs and bars on stderr, bars only on a terminal."""

from __future__ import annotations

import logging

import click
import pytest
from click.testing import CliRunner
from lors_fast.cli import _logging, main


@pytest.fixture
def probe(monkeypatch):
    """A temporary command that logs at each level, prints a result and reports progress_enabled()."""

    @click.command("probe-logging")
    @click.option("--progress/--no-progress", default=True)
    def cmd(progress):
        log = logging.getLogger("lors_fast.engine.probe")
        log.debug("debug-line")
        log.info("info-line")
        log.warning("warning-line")
        click.echo(f"result progress={_logging.progress_enabled(progress)}")

    monkeypatch.setitem(main.commands, "probe-logging", cmd)
    yield
    # leave the lors_fast logger as the default CLI run would
    _logging.setup_logging()


def _run(*args):
    r = CliRunner().invoke(main, [*args, "probe-logging"])
    assert r.exit_code == 0, r.output
    return r


def test_default_info_on_stderr_result_on_stdout(probe):
    r = _run()
    assert "info-line" in r.stderr and "warning-line" in r.stderr and "debug-line" not in r.output
    assert "result" in r.stdout and "info-line" not in r.stdout
    assert logging.getLogger("lors_fast").level == logging.INFO


def test_verbose_and_quiet(probe):
    r = _run("-v")
    assert "debug-line" in r.stderr and "lors_fast.engine.probe" in r.stderr  # logger names with -v
    r = _run("-q")
    assert "info-line" not in r.output and "warning-line" in r.stderr and "result" in r.stdout
    r = _run("-qq")
    assert "warning-line" not in r.output and "result" in r.stdout
    r = CliRunner().invoke(main, ["-v", "-q", "probe-logging"])
    assert r.exit_code == 2 and "mutually exclusive" in r.output
    # one handler, however often the group runs
    assert sum(h.get_name() == _logging.HANDLER_NAME for h in logging.getLogger("lors_fast").handlers) == 1


def test_progress_only_on_a_terminal_and_never_quiet(probe, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # restored afterwards
    assert "progress=False" in _run().stdout  # CliRunner's stderr is no terminal
    import os

    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # third-party bars off with ours
    monkeypatch.setattr(_logging, "_isatty", lambda stream: True)
    assert "progress=True" in _run().stdout
    assert "progress=False" in CliRunner().invoke(main, ["probe-logging", "--no-progress"]).stdout
    assert "progress=False" in _run("-q").stdout


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")
def test_third_party_bars_silenced(monkeypatch):
    pytest.importorskip("transformers")
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # restored afterwards
    enable_progress_bars()
    hf_logging.enable_progress_bar()
    monkeypatch.setattr(_logging, "_isatty", lambda stream: False)
    _logging.setup_logging()
    assert _logging.progress_enabled(True) is False
    assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    enable_progress_bars()
    hf_logging.enable_progress_bar()


def test_level_for():
    assert _logging.level_for(0, 0) == logging.INFO
    assert _logging.level_for(2, 0) == logging.DEBUG
    assert _logging.level_for(0, 1) == logging.WARNING
    assert _logging.level_for(0, 3) == logging.ERROR
    with pytest.raises(ValueError):
        _logging.level_for(1, 1)
