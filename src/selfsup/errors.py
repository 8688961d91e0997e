"""The typed errors of every expected failure, and the exit code ``selfsup`` gives each.

``selfsup`` prints one of these as one line, ``error: <what> (<fix>)``, and exits with the
class's :attr:`SelfsupError.exit_code`; ``--debug`` (or ``SELFSUP_DEBUG=1``) shows the
traceback instead. Anything else is a bug and keeps its traceback.

=============================  ====  ======================================================
class                          exit  raised for
=============================  ====  ======================================================
:class:`ConfigError`              2  a config key, type or value; a device that is missing
:class:`DataError`                3  a data set that is missing, empty, unreadable or too small
:class:`CheckpointError`          4  a run folder or checkpoint: missing, foreign, in use
:class:`TrainingError`            5  training diverged (non-finite loss or weights)
:class:`StorageError`             6  the disk is full (or another write failure) while saving
:class:`RunInterrupted`     130/143  SIGINT / SIGTERM: the run saved a checkpoint and stopped
=============================  ====  ======================================================

This module is the bottom layer: it imports nothing from selfsup.
"""

from __future__ import annotations

import signal


class SelfsupError(Exception):
    """An expected failure with a one-line message saying what happened and how to fix it."""

    exit_code = 1


class ConfigError(SelfsupError, ValueError):
    """A config key is unknown, has a wrong type or an invalid value."""

    exit_code = 2


class DataError(SelfsupError, ValueError):
    """Bad input data or arguments; the message names the path or key and how to fix it."""

    exit_code = 3


class CheckpointError(SelfsupError, RuntimeError):
    """A checkpoint or run folder is missing, unreadable, refused or does not fit the run."""

    exit_code = 4


class TrainingError(SelfsupError, FloatingPointError):
    """Training diverged: a loss, the weights or the optimiser state became non-finite."""

    exit_code = 5


class StorageError(SelfsupError, OSError):
    """Writing a run's files failed (no space left on device, quota, read-only file system)."""

    exit_code = 6


class RunInterrupted(SelfsupError):
    """SIGINT or SIGTERM stopped the run (after saving a checkpoint, when training).

    The exit code is the shell's convention for death by that signal (128 + its number:
    130 for SIGINT, 143 for SIGTERM), which schedulers such as SLURM read to requeue a job.
    """

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def exit_code_of(err: BaseException) -> int:
    """The exit code ``selfsup`` gives for ``err`` (1 for an unexpected error)."""
    return int(getattr(err, "exit_code", 1)) if isinstance(err, SelfsupError) else 1
