"""The datasets a run trains on, as its config says: supervised data, or what its preference method reads.

    datasets = build_run_datasets(config, tokenizer)

The one entry point of `tuneforge train`, `tuneforge data preview` and `tuneforge preprocess`, so
all three build, and find in the tokenisation cache, the same datasets.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.schema import Config, PreferenceMethod
from tuneforge.data.build import Datasets, build_datasets
from tuneforge.data.preference import build_preference_datasets
from tuneforge.models.vlm import prepare_image_inputs


def build_run_datasets(
    config: Config, tokenizer: Any, *, peers_wait: bool = False, wait_seconds: float | None = None
) -> Datasets:
    """`build_preference_datasets` under a preference method, else `build_datasets` (with a VLM's image inputs).

    `peers_wait` / `wait_seconds`: the cache's file barrier between processes (see `cached_datasets`).
    """
    if isinstance(config.method, PreferenceMethod):
        return build_preference_datasets(
            config.data, tokenizer, seed=config.train.seed, method=config.method,
            peers_wait=peers_wait, wait_seconds=wait_seconds,
        )
    return build_datasets(
        config.data, tokenizer, seed=config.train.seed, batch_size=config.train.per_device_train_batch_size,
        images=prepare_image_inputs(config.model, tokenizer), peers_wait=peers_wait, wait_seconds=wait_seconds,
    )


__all__ = ["build_run_datasets"]
