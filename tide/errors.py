"""The base of every error that tide reports to a user as one clear line (bad config, bad input,
bad weights); anything else is a bug and keeps its traceback."""


class TideError(Exception):
    pass
