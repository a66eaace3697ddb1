"""Errors that are the user's to fix (input files, weights, options), shown without a traceback by the CLI."""

from __future__ import annotations


class GaussFTUserError(Exception):
    """Base of GaussFT's errors whose message alone says what is wrong and how to fix it.

    Under anomalib's command line (``anomalib train|test|predict|export``) such an error is printed as
    ``error: <message>`` with exit status 1 instead of a rich traceback of a hundred lines; from Python it is
    an ordinary exception.
    """
