"""`tuneforge preprocess CONFIG`: tokenise and cache the data before a (multi-GPU) launch."""

from __future__ import annotations

import argparse

from tuneforge.cli.config_arguments import add_config_arguments

HELP = "tokenise the config's data into the cache, so training starts without preprocessing"
EXAMPLE = "tuneforge preprocess examples/quickstart.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tuneforge.config.loading import load_config
    from tuneforge.data.cache import cache_root
    from tuneforge.data.run import build_run_datasets
    from tuneforge.models.loading import load_tokenizer

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model)
    datasets = build_run_datasets(config, tokenizer)  # what `tuneforge train` looks up, preference data too
    for stats in datasets.stats:
        print(stats.describe())
    state = "already cached" if datasets.from_cache else "cached"
    print(f"{state}: {cache_root(config.data) / str(datasets.fingerprint)}")
    return 0
