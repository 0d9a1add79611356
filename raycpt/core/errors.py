"""The one exception type for bad user input: the CLI prints it as one line and exits with code 2."""


class InputError(Exception):
    """Bad input (config, corpus, labels, model path, cluster settings). The message names what and how to fix."""


class ConfigError(InputError):
    """The experiment config is invalid; the message lists every problem found, one per line."""


class ExportCheckError(Exception):
    """The exported model does not reproduce its trial's numbers on reload: the CLI says so in one line, exit 1
    (the export and its card, which records both sets of numbers, stay on disk)."""
