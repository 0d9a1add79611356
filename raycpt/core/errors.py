"""The one exception type for bad user input: the CLI prints it as one line and exits with code 2."""


class InputError(Exception):
    """Bad input (config, corpus, labels, model path, cluster settings). The message names what and how to fix."""


class ConfigError(InputError):
    """The experiment config is invalid; the message lists every problem found, one per line."""
