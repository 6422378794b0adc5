"""The one exception type biasgen raises for problems the user can fix, and the command line's error lines."""
from __future__ import annotations

import errno


class BiasgenError(Exception):
    """Bad input or an impossible request.

    The message names the problem and the fix. The command line prints it
    without a traceback and exits with status 2.
    """


OS_FIXES = {  # errno -> what the user can do about it
    errno.ENOSPC: "the disk is full: free some space, then continue with --resume (finished work is kept)",
    errno.EDQUOT: "the disk quota is used up: free some space, then continue with --resume (finished work is kept)",
    errno.EROFS: "the file system is read-only: choose a folder you can write (--out elsewhere)",
    errno.EACCES: "permission denied: choose a folder you can write (--out elsewhere), or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you can write (--out elsewhere), or fix its permissions",
    errno.ELOOP: "a loop of symbolic links: give the real path",
    errno.ENOTDIR: "part of the path is a file, not a folder: give a path made of folders",
    errno.EISDIR: "it is a folder where a file was expected: give a file",
    errno.ENOENT: "it does not exist: check the path",
}


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error: the path, the problem and what to do."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None) or "a file"
    return f"cannot use {where}: {OS_FIXES.get(e.errno, e.strerror or str(e))}."


def run_command(command: str, call, out=None) -> int:
    """Run ``call()`` for the command line and return its exit status.

    A :class:`BiasgenError` prints ``biasgen COMMAND: error: ...`` and gives 2, as does an operating-system
    error (a read-only or full disk, a missing permission: the line names the path); Ctrl-C gives 130 and,
    when the command writes to a folder ``out``, the ``--resume`` command that continues it.
    """
    import sys

    try:
        return call()
    except BiasgenError as e:
        print(f"biasgen {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"biasgen {command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = f"; continue with --resume --out {out}" if out is not None else ""
        print(f"\nbiasgen {command}: interrupted{hint}", file=sys.stderr)
        return 130
