"""`tuneforge preprocess CONFIG`: tokenise and cache the data before a (multi-GPU) launch."""

from __future__ import annotations

import argparse

HELP = "tokenise the config's data into the cache, so training starts without preprocessing"
EXAMPLE = "tuneforge preprocess examples/quickstart.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")


def run(args: argparse.Namespace) -> int:
    from tuneforge.config.loading import load_config
    from tuneforge.data.build import build_datasets
    from tuneforge.data.cache import DataCache
    from tuneforge.models.loading import load_tokenizer

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model)
    datasets = build_datasets(config.data, tokenizer, seed=config.train.seed)
    for stats in datasets.stats:
        print(stats.describe())
    state = "already cached" if datasets.from_cache else "cached"
    print(f"{state}: {DataCache(config.data, tokenizer, config.train.seed).path}")
    return 0
