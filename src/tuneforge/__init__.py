"""tuneforge: fine-tune language models from one YAML file.

    tuneforge train examples/quickstart.yaml

The Python entry point mirrors the CLI: ``tuneforge.train("config.yaml")``.
"""

__version__ = "0.1.0"

from tuneforge.errors import ConfigError, DataError, ModelError, TuneforgeError


def train(config, overrides=None):
    """Run a training job from a config path, a dict, or a ``Config``; returns a ``RunResult``."""
    from tuneforge.train.recipe import train as _train

    return _train(config, overrides=overrides)


__all__ = ["ConfigError", "DataError", "ModelError", "TuneforgeError", "__version__", "train"]
