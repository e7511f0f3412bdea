"""tuneforge: fine-tune language models from one YAML file.

    tuneforge train examples/quickstart.yaml

The Python entry point mirrors the CLI: ``tuneforge.train("config.yaml")``, and
``tuneforge.Finetuner`` builds the same config in a few calls (docs/python-api.md).
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
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from tuneforge.infer.merge import merge_run
        from tuneforge.train.distributed import Ranks

        if Ranks.from_env().is_main:  # one process writes merged/; the others are done
            # The run's DeepSpeed ZeRO-3 config would make transformers load the base partitioned
            # across processes that no longer take part: the merge loads it whole.
            unset_hf_deepspeed_config()
            report = merge_run(result.run_dir, result.run_dir / "merged")
            print(f"[tuneforge] merged weights in {report.out_dir} (max logit gap {report.max_logit_gap:.2e})", flush=True)
    return result


def __getattr__(name):
    # Lazy, so `import tuneforge` stays light until the API is used.
    if name == "Finetuner":
        from tuneforge.api import Finetuner

        return Finetuner
    raise AttributeError(f"module 'tuneforge' has no attribute '{name}'")


__all__ = ["ConfigError", "DataError", "Finetuner", "ModelError", "TuneforgeError", "__version__", "train"]
