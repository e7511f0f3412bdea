"""tuneforge: fine-tune language models from one YAML file.

    tuneforge train examples/quickstart.yaml

The Python entry point mirrors the CLI: ``tuneforge.train("config.yaml")``.
"""

__version__ = "0.1.0"

import tuneforge.train as _train_stage  # noqa: F401  bind the stage package first: `train` below keeps its name
from tuneforge.errors import ConfigError, DataError, ModelError, TuneforgeError


def train(config, overrides=None, callbacks=None):
    """Train as a config (path, dict or ``Config``) says, then run its post-training steps.

    The recipe trains and writes the run; a LoRA run with ``method.merge: true`` is then merged
    by the infer stage onto a full-precision copy of the base and checked against the adapter.
    Returns the recipe's ``RunResult``.
    """
    from tuneforge.config.loading import load_config
    from tuneforge.train.recipe import train as run_recipe

    config = load_config(config, overrides)
    result = run_recipe(config, callbacks=callbacks)
    if getattr(config.method, "merge", False):
        from tuneforge.infer.merge import merge_run

        report = merge_run(result.run_dir, result.run_dir / "merged")
        print(f"[tuneforge] merged weights in {report.out_dir} (max logit gap {report.max_logit_gap:.2e})", flush=True)
    return result


__all__ = ["ConfigError", "DataError", "ModelError", "TuneforgeError", "__version__", "train"]
