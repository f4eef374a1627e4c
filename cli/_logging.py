"""The one logging setup of every `lors-fast` command.

- The library logs with :mod:`logging` (loggers under ``lors_fast``); the CLI prints results on stdout.
- ``-v`` / ``-q`` on the group: log level DEBUG / WARNING (INFO by default), on stderr.
- Progress bars (tqdm) go to stderr and are shown only when stderr is a terminal, the level is INFO or
  more verbose, and the command's ``--progress`` (where it has one) is on; when ours are off, the bars of
  transformers and huggingface_hub are off too (and their INFO chatter follows ``-q``).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging", "progress_enabled", "level_for", "HANDLER_NAME"]

#: name of the handler this module installs on the ``lors_fast`` logger (replaced, never duplicated)
HANDLER_NAME = "lors-fast-cli"
_THIRD_PARTY = ("transformers", "huggingface_hub", "timm", "open_clip", "deepspeed", "torch.distributed")
_state = {"level": logging.INFO}


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # logging.StreamHandler.__init__ / setStream assign it; always follow sys.stderr
        pass


def level_for(verbose: int, quiet: int) -> int:
    """The log level of ``-v`` given ``verbose`` times and ``-q`` given ``quiet`` times (INFO when neither)."""
    if verbose and quiet:
        raise ValueError("-v and -q are mutually exclusive")
    if quiet:
        return logging.WARNING if quiet == 1 else logging.ERROR
    return logging.DEBUG if verbose else logging.INFO


def setup_logging(verbose: int = 0, quiet: int = 0) -> int:
    """Configure the ``lors_fast`` logger (one stderr handler) and third-party loggers; returns the level."""
    level = level_for(verbose, quiet)
    _state["level"] = level
    root = logging.getLogger("lors_fast")
    for h in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(h)
    handler = _StderrHandler()
    handler.set_name(HANDLER_NAME)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if level <= logging.DEBUG else "%(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # other libraries: their INFO chatter only with -v
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING))
    return level


def _silence_third_party_bars() -> None:
    """Turn off the progress bars of transformers and huggingface_hub (imported now or later)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub (and so transformers) loads
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress_enabled(requested: bool = True) -> bool:
    """Whether to show progress bars: ``requested``, stderr is a terminal, and not ``-q``.

    When the answer is no, transformers' and huggingface_hub's bars are silenced as well."""
    on = bool(requested) and _state["level"] <= logging.INFO and _isatty(sys.stderr)
    if not on:
        _silence_third_party_bars()
    return on


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
