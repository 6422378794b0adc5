"""The one exception type biasgen raises for problems the user can fix."""


class BiasgenError(Exception):
    """Bad input or an impossible request.

    The message names the problem and the fix. The command line prints it
    without a traceback and exits with status 2.
    """
