"""Running a command for a person: a failure caused by the input reads as one line on stderr,
not a traceback, and progress bars show only on a terminal.

Each command's `main` is decorated with `command`; `--debug` (`add_debug_flag`) or
CAPTIONING_DEBUG=1 shows the traceback instead. CAPTIONING_PROGRESS=1 (or 0) turns progress bars
on (or off) whatever the output is (`progress_disabled`).
"""

import functools
import os
import sys

from captioning.errors import USER_ERRORS

INTERRUPTED = 130  # the shell's exit status for a command stopped by Ctrl-C (128 + SIGINT)


def is_user_error(error):
    """Whether `error` means bad input or a broken environment (a person can act on its message)
    rather than a bug, whose traceback must show (`errors.USER_ERRORS`)."""
    return isinstance(error, USER_ERRORS)


def env_flag(name):
    """True for an environment variable set to 1 (true, yes, on), False for 0 (false, no, off),
    None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def in_notebook():
    """Whether this runs in a Jupyter kernel, whose bars are widgets, not carriage returns."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_disabled(progress=True):
    """tqdm's `disable=` for a progress bar that `progress` asks for: shown only on a terminal
    (stderr, where tqdm writes) or in a notebook, so that logs get no carriage-return updates,
    unless CAPTIONING_PROGRESS says otherwise; `progress=False` is always off."""
    if not progress:
        return True
    forced = env_flag("CAPTIONING_PROGRESS")
    if forced is not None:
        return not forced
    isatty = getattr(sys.stderr, "isatty", None)
    return not (isatty and isatty() or in_notebook())


def add_debug_flag(parser):
    """Give a command's `parser` the --debug flag that `command` acts on."""
    parser.add_argument(
        "--debug", action="store_true",
        help="on an error, show the Python traceback (also: CAPTIONING_DEBUG=1)",
    )  # fmt: skip
    return parser


def command(main):
    """Decorate a command's `main(argv=None)`: a user error (`is_user_error`) prints
    "<command>: error: <message>" to stderr and exits 1, Ctrl-C prints one line and exits 130,
    both re-raised with --debug in argv or CAPTIONING_DEBUG=1; any other error (a bug) keeps its
    traceback. Returns what `main` returns; its `console_script` is the installed command's
    entry point (pyproject.toml's [project.scripts]), which returns the exit status 0 instead."""

    @functools.wraps(main)
    def run(argv=None):
        args = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in args or env_flag("CAPTIONING_DEBUG")
        name = os.path.basename(sys.argv[0]) or "captioning"  # as argparse names it
        try:
            return main(argv)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{name}: interrupted", file=sys.stderr)
            raise SystemExit(INTERRUPTED) from None
        except Exception as error:
            if debug or not is_user_error(error):
                raise
            print(f"{name}: error: {str(error) or type(error).__name__}", file=sys.stderr)
            raise SystemExit(1) from None

    # The script pip writes runs `sys.exit(entry())`: handed `main`'s results, sys.exit would
    # print them to stderr and exit 1. Failures leave `run` as SystemExit with their status.
    def console_script():
        """The installed command: runs `main` on sys.argv, then exit status 0."""
        run()
        return 0

    run.console_script = console_script
    return run
