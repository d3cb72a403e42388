"""User-facing errors: one line on stderr and exit status 2, never a traceback."""
import sys


class UserError(Exception):
    """A problem with the user's input (flags, files, checkpoints) that the user can fix."""


def run_main(main, parser):
    """Entry point used by every script: parse, run, and turn a UserError into a one-line message."""
    args = parser.parse_args()
    try:
        return main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
