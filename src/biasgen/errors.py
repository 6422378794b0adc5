"""The one exception type biasgen raises for problems the user can fix."""


class BiasgenError(Exception):
    """Bad input or an impossible request.

    The message names the problem and the fix. The command line prints it
    without a traceback and exits with status 2.
    """


def run_command(command: str, call, out=None) -> int:
    """Run ``call()`` for the command line and return its exit status.

    A :class:`BiasgenError` prints ``biasgen COMMAND: error: ...`` and gives 2; Ctrl-C gives 130 and, when the
    command writes to a folder ``out``, the ``--resume`` command that continues it.
    """
    import sys

    try:
        return call()
    except BiasgenError as e:
        print(f"biasgen {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = f"; continue with --resume --out {out}" if out is not None else ""
        print(f"\nbiasgen {command}: interrupted{hint}", file=sys.stderr)
        return 130
