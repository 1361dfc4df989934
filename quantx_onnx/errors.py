"""Errors the CLI reports as one line with a documented exit code (see README)."""

from __future__ import annotations


class QuantXError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class InputError(QuantXError):
    """Missing, unreadable or invalid input (model file, external data, flags)."""

    exit_code = 2


class NothingToQuantize(QuantXError):
    """The model has no MatMul/Gemm/Gather with a constant weight to rewrite."""

    exit_code = 3


class OutputError(QuantXError):
    """The output cannot be written (refused path, permissions, disk full)."""

    exit_code = 4


class Interrupted(QuantXError):
    """SIGINT/SIGTERM arrived; partial output was removed."""

    exit_code = 130
