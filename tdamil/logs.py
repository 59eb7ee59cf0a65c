"""One log format for every command of the project, Flower's lines included.

Flower 1.42 gives its ``flwr`` logger its own coloured console handler (``INFO :      ...``, no
time, no source) and lets the records propagate too, so a process that also configures the root
logger prints every Flower line twice. :func:`setup_logging` configures the root logger with
:data:`LOG_FORMAT` (date and time, level, source) and takes Flower's console handler off, so each
line is printed once, in that format. :func:`format_flower_console` is for processes that Flower
owns (``flwr-serverapp``): there Flower's console handler is what reaches the coordinator's log
stream, so it is kept and only given the same format.
"""

from __future__ import annotations

import logging
import re
import time

__all__ = ["LOG_FORMAT", "DATE_FORMAT", "setup_logging", "route_flower_to_root", "format_flower_console",
           "flower_console_handlers", "reformat_flower_line", "one_line",
           "one_line_error"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def _formatter() -> logging.Formatter:
    return logging.Formatter(LOG_FORMAT, DATE_FORMAT)


def flower_console_handlers() -> list[logging.Handler]:
    """Flower's own console handlers attached to the ``flwr`` logger."""
    from flwr.common.logger import ConsoleHandler  # noqa: PLC0415

    return [h for h in logging.getLogger("flwr").handlers if isinstance(h, ConsoleHandler)]


def setup_logging(verbose: bool = False, level: int | str | None = None) -> None:
    """Root logging for every command of the project: one line per record,
    ``2026-01-31 14:02:03 INFO flwr: ...``; Flower's lines go through it once.

    ``level`` (a name like ``"WARNING"`` or a number) wins over ``verbose`` (DEBUG) and the default INFO.
    """
    if level is None:
        level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    route_flower_to_root()
    if not verbose:  # one INFO line per HTTP request (a site's SuperExec polls 10 times a second) is noise
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def route_flower_to_root() -> None:
    """Take Flower's console handler off the ``flwr`` logger so its records reach the root
    logger's handlers only (once), at the root logger's level."""
    flwr_logger = logging.getLogger("flwr")
    for handler in flower_console_handlers():
        flwr_logger.removeHandler(handler)
    root_level = logging.getLogger().level
    if flwr_logger.level < root_level:  # Flower sets DEBUG; propagated records skip the root's level check
        flwr_logger.setLevel(root_level)
    flwr_logger.propagate = True


def format_flower_console() -> list[logging.Handler]:
    """Give Flower's console handlers the project's format (kept attached: Flower redirects their
    stream to its log uploader); returns them so other loggers can share them."""
    handlers = flower_console_handlers()
    fmt = _formatter()
    for handler in handlers:
        handler.format = fmt.format  # type: ignore[method-assign]  # ConsoleHandler.format ignores setFormatter
    return handlers


# Flower's console format: "<colour>INFO [time]<reset>:       message" (colour codes optional)
_FLOWER_LINE = re.compile(r"^(?:\x1b\[\d+m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL) ?"
                          r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)?(?:,\d+)?(?:\x1b\[0m)?: +(.*)$", re.DOTALL)


def reformat_flower_line(line: str, source: str = "flwr") -> str:
    """A line printed by a Flower process (``\\x1b[92mINFO \\x1b[0m:      msg``) in the project's
    format (``2026-01-31 14:02:03 INFO flwr: msg``); other lines are returned unchanged."""
    m = _FLOWER_LINE.match(line.rstrip("\n"))
    if m is None:
        return line
    level, stamp, message = m.groups()
    stamp = stamp or time.strftime(DATE_FORMAT)
    return f"{stamp} {level} {source}: {message}" + ("\n" if line.endswith("\n") else "")


def one_line(exc: BaseException | str) -> str:
    """An error's message on one line, without Python's wrappers: what a command prints after
    ``error:`` (once; the command does not also log it)."""
    return " ".join(str(exc).split())


def one_line_error(error: BaseException | str) -> str:
    """An error on one line, without the ``<class 'ValueError'>:<'...'>`` wrapper Flower puts around
    an exception raised in a ServerApp or ClientApp."""
    return re.sub(r"<class '[\w.]+'>:<(['\"])(.*?)\1>", r"\2", one_line(error))
