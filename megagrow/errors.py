"""Errors a user can cause, and the one-line report the command-line tools give for them."""

import argparse
import functools
import sys


class UserError(Exception):
    """A mistake the user can fix (bad path, corrupt file, conflicting flags); the message says how."""

    exit_code = 2


class JobFailure(UserError):
    """A rank of a multi-process job was lost or stuck: not the user's mistake, but reported the same way, in one line."""

    exit_code = 1


def report(err: UserError) -> None:
    """Print a UserError as the tools do: one line on stderr."""
    print(f"error: {err}", file=sys.stderr, flush=True)


def exit_on_user_error(main):
    """Wrap a CLI `main` so a UserError prints one line to stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            report(err)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted; outputs not yet complete were not kept", file=sys.stderr)
            sys.exit(130)

    return wrapper


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: a whole number >= 1, refused by argparse with one line otherwise."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
