"""The one exception users see: bad input, named culprit, what to do. The CLI prints it as one line."""


class GlueError(ValueError):
    """A problem with the user's input (expert, dataset, column, option), found before or during a run.

    The message names the culprit and the fix; the CLI prints it without a traceback.
    """
