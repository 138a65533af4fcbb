"""The tiny MLP config of tests/tiny.py as a config file for CLI tests (set --config.data.dir)."""

from tests.tiny import tiny_config


def get_config():
    return tiny_config("")
