"""The training recipe: config in, run directory out.

    tuneforge train examples/quickstart.yaml          # CLI
    tuneforge.train("examples/quickstart.yaml")       # Python

YAML -> Config -> tokenizer + datasets -> model + method -> Trainer -> model/, metrics.jsonl.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from tuneforge.config.loading import dump_config, load_config
from tuneforge.config.optimizers import optimizer_cls_and_kwargs
from tuneforge.config.schema import (
    PREFERENCE_FORMATS,
    Config,
    DatasetSpec,
    GrpoMethod,
    LoraMethod,
    PreferenceMethod,
    weights_method,
)
from tuneforge.config.training_args import to_training_arguments
from tuneforge.data.build import SUPERVISED_FORMATS, Datasets
from tuneforge.data.formats import row_to_messages
from tuneforge.data.images import VISION_FORMATS, ImageCollator, ImageInputs
from tuneforge.data.packing import PackedCollator
from tuneforge.data.run import build_run_datasets
from tuneforge.data.sources import read_rows
from tuneforge.data.templates import (
    Template,
    encode_generation_prompt,
    template_to_metadata,
)
from tuneforge.data.tokenize import IGNORE_INDEX
from tuneforge.errors import ConfigError
from tuneforge.methods.prepare import ParameterCounts, prepare_model
from tuneforge.methods.qat import save_quantized
from tuneforge.models.attention import enable_packed_attention
from tuneforge.models.generation import generate_texts
from tuneforge.models.loading import (
    add_new_token_rows,
    load_model,
    load_tokenizer,
    preflight,
    register_custom_model,
)
from tuneforge.models.vlm import (
    fit_to_tokenizer,
    save_processor,
    vlm_method,
)
from tuneforge.plan.estimate import Strategy, matmul_peak_tflops, model_flops_per_token
from tuneforge.plan.planner import check_before_training
from tuneforge.train.callbacks import (
    MetricsLogger,
    TrainingProgress,
    report_after_metrics,
)
from tuneforge.train.checkpoints import estimate_run_bytes
from tuneforge.train.distributed import (
    Ranks,
    barrier,
    check_engine,
    check_resume_layout,
    checkpoint_layout,
    engine_arguments,
    export_shapes,
    keep_gradients_in_buckets,
    planned_engine,
    skip_unused_parameter_search,
    start_process_group,
    use_full_state_dict,
    verify_export,
)
from tuneforge.train.eval_callback import EvalTasksCallback
from tuneforge.train.layer_graphs import peak_memory_allocated, reset_peak_memory
from tuneforge.train.preemption import install_preemption_handlers, raise_if_preempted
from tuneforge.train.preference import (
    build_preference_trainer,
    check_rewards,
    preference_arguments,
    preference_report,
)
from tuneforge.train.run_dir import (
    check_disk_space,
    check_resume_data,
    checkpoint_step,
    find_resume_checkpoint,
    prepare_run_dir,
    trim_metrics,
    write_run_metadata,
)
from tuneforge.train.speed import (
    FusedLoraActivations,
    SpeedPlan,
    compile_decoder_layers,
    plan_speed,
)
from tuneforge.train.spike import count_rollbacks
from tuneforge.train.summary import (
    RunResult,
    print_summary,
    write_report,
    write_summary,
)
from tuneforge.train.trainer import TuneforgeTrainer
from tuneforge.train.watchdog import StallWatchdog


def _watchdog(config: Config) -> list[TrainerCallback]:
    minutes = config.guards.stall_minutes
    return [StallWatchdog(minutes * 60)] if minutes else []


def _say(message: str) -> None:
    if Ranks.from_env().is_main:  # one copy of each message, not one per process
        print(f"[tuneforge] {message}", flush=True)


def _build_training_arguments(config: Config, run_dir: Path) -> transformers.TrainingArguments:
    if config.data.packing:
        # Packed batches have no padding, and position_ids must reach the model even when its
        # forward signature does not name them (they carry the example boundaries).
        runtime = {"include_num_input_tokens_seen": "all", "remove_unused_columns": False}
    else:
        # Count real (non-padding) tokens so throughput is honest.
        runtime = {"include_num_input_tokens_seen": "non_padding"}
    # Batches are pinned (dataloader_pin_memory); a blocking copy to the GPU would wait for every
    # kernel queued before it, leaving the GPU without work while the host starts the step.
    runtime["accelerator_config"] = {"non_blocking": True}
    runtime.update(engine_arguments(config.distributed, Ranks.from_env().world_size))
    try:
        args = to_training_arguments(config.train, str(run_dir), disable_tqdm=True, **runtime)
        args = preference_arguments(config, args) if isinstance(config.method, PreferenceMethod) else args
    except (ValueError, ImportError) as exc:
        raise ConfigError(
            str(exc).strip().splitlines()[0],
            where="train",
            hint="transformers rejected this combination of train settings",
        ) from None
    return one_gpu_per_process(args)


def one_gpu_per_process(args: transformers.TrainingArguments) -> transformers.TrainingArguments:
    """One process sees several GPUs: train on the first, not through `nn.DataParallel`.

    Without a launcher the Trainer splits each batch over every visible GPU with DataParallel,
    which is slower than DDP and breaks models whose forward is not replica-safe (Liger's fused
    loss, tied or packed inputs: "index is on cuda:1"). The Trainer turns DataParallel off the
    same way for model-parallel models (`args._n_gpu = 1`).
    """
    if args.n_gpu > 1:
        _say(
            f"{args.n_gpu} GPUs visible to one process: training on {args.device} only. "
            f"`tuneforge train CONFIG --nproc-per-node {args.n_gpu}` trains on all of them (DDP)"
        )
        args._n_gpu = 1
    return args


def _save_base(model: Any, tokenizer: Any, base_dir: Path) -> None:
    """The base weights next to the adapter, written by the main rank.

    Under DeepSpeed ZeRO-3 every parameter tensor is empty on every rank (the model was
    partitioned while it loaded): all ranks gather them, one at a time (a collective each, so no
    rank may skip it, even when `base_dir` exists), and the main rank saves the gathered copy.
    """
    write = Ranks.from_env().is_main and not base_dir.exists()
    state_dict = None
    if is_deepspeed_zero3_enabled():
        import deepspeed

        state_dict = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            partitioned = [tensor] if hasattr(tensor, "ds_id") else []
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                if write:
                    state_dict[name] = tensor.detach().to("cpu", copy=True)
    if write:
        model.save_pretrained(str(base_dir), state_dict=state_dict)
        tokenizer.save_pretrained(str(base_dir))


def _attach_input_grads_for_checkpointing(model: Any, args: transformers.TrainingArguments) -> None:
    # With frozen embeddings, checkpointed blocks see inputs without grad and nothing
    # upstream of them trains; PEFT and freeze both need the inputs to carry grad.
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _save_final(
    config: Config, trainer: Trainer, tokenizer: Any, datasets: Datasets, run_dir: Path, base_dir: Path | None,
    model_class: str | None = None,
) -> Path:
    model_dir = run_dir / "model"
    # Preference replies are encoded like supervised ones: generation needs the same template.
    supervised = config.data.datasets[0].format in (*SUPERVISED_FORMATS, *PREFERENCE_FORMATS)
    template = template_to_metadata(datasets.template) if supervised and datasets.template else None
    if supervised and datasets.template is not None:
        # Exports are self-contained (PITFALLS 18): plain `apply_chat_template` formats prompts
        # as training did, and `generate` stops at the trained terminator.
        tokenizer.chat_template = datasets.template.chat_template
        generation_config = getattr(trainer.model, "generation_config", None)
        if generation_config is not None:
            generation_config.eos_token_id = datasets.template.stop_token_ids(tokenizer)
    use_full_state_dict(trainer)  # the export is a standard checkpoint, whatever the checkpoints are
    trainer.save_model(str(model_dir))  # every rank: sharded engines gather the weights to rank 0
    if not trainer.is_world_process_zero():
        return model_dir
    verify_export(model_dir, export_shapes(trainer.model))  # against the trained shapes: no partial gathers
    tokenizer.save_pretrained(str(model_dir))
    if datasets.images is not None:
        save_processor(model_dir, tokenizer, datasets.images, trainer.model)
    is_adapter = isinstance(weights_method(config.method), LoraMethod)
    base = str(base_dir.resolve()) if base_dir is not None else config.model.path
    write_run_metadata(
        model_dir,
        base_model=base if is_adapter else None,
        adapter=is_adapter,
        template=template,
        system_prompt=config.data.datasets[0].system_prompt,
        trust_remote_code=config.model.trust_remote_code,
        model_class=model_class,
    )
    qat = getattr(config.method, "qat", None)
    if qat is not None and qat.convert:
        quantized_dir = run_dir / "quantized"
        save_quantized(str(model_dir), str(quantized_dir), qat)
        tokenizer.save_pretrained(str(quantized_dir))
        _say(f"quantized weights ({qat.weights} weights, {qat.activations} activations) written to {quantized_dir}")
    return model_dir


def _show_samples(config: Config, model: Any, tokenizer: Any, template: Template | None) -> list[dict[str, str]]:
    samples_config = config.output.samples
    spec: DatasetSpec = config.data.datasets[0]
    # Samples show text prompts; image rows would need their images (not shown yet).
    if samples_config is None or template is None or spec.format not in SUPERVISED_FORMATS or spec.format in VISION_FORMATS:
        return []
    sample_spec = spec.model_copy(update={"path": samples_config.path, "source": None, "max_rows": None})
    rows = read_rows(sample_spec, "output.samples")[: samples_config.count]
    conversations = [row_to_messages(row, sample_spec) for row in rows]
    prompt_ids = [encode_generation_prompt(tokenizer, template, messages[:-1]) for messages in conversations]
    outputs = generate_texts(
        model, tokenizer, prompt_ids, max_new_tokens=samples_config.max_new_tokens,
        stop_token_ids=template.stop_token_ids(tokenizer),
    )
    samples = []
    correct = 0
    _say(f"generations for {len(rows)} held-out prompts from {samples_config.path}:")
    for messages, output in zip(conversations, outputs):
        question, reference = messages[-2]["content"], messages[-1]["content"]
        right = output.strip() == reference.strip()
        correct += right
        print(f"  {'ok ' if right else '   '} {question!r:<52} -> {output.strip()!r}  (reference {reference.strip()!r})")
        samples.append({"prompt": question, "output": output, "reference": reference})
    _say(f"{correct} of {len(rows)} exactly right")
    return samples


def _log_data(datasets: Datasets) -> None:
    for stats in datasets.stats:
        _say(stats.describe())
    eval_rows = len(datasets.eval) if datasets.eval is not None else 0
    train_rows = len(datasets.train) if hasattr(datasets.train, "__len__") else "streamed"
    _say(f"training examples: {train_rows}, evaluation examples: {eval_rows}")
    if datasets.packing is not None:
        _say(datasets.packing.describe())


def _check_data(config: Config, datasets: Datasets) -> None:
    if isinstance(config.method, GrpoMethod):
        # GRPO trains on the completions it generates, not on tokens of the data; its rewards are
        # checked against the data's columns now, before the model loads.
        check_rewards(config.method, datasets.train.column_names)
    elif sum(stats.trained_tokens for stats in datasets.stats if not stats.name.endswith("(eval)")) == 0 and not config.data.streaming:
        raise ConfigError(
            "no token of the training data is trained on (every label is masked)",
            where="data",
            hint="check response_field and the template",
        )
    if config.data.streaming and config.train.max_steps <= 0:
        raise ConfigError(
            "a streamed dataset has no length, so the run needs a step budget",
            where="train.max_steps",
            hint="set train.max_steps",
        )


def _setup_model(
    config: Config, args: transformers.TrainingArguments, tokenizer: Any, run_dir: Path,
    images: ImageInputs | None = None,
) -> tuple[Any, ParameterCounts, Path | None, str | None, SpeedPlan]:
    """Load the model, pick packed attention, keep random base weights, apply the method, plan its speed settings."""
    model = load_model(config.model)
    method = weights_method(config.method)
    if images is not None:
        fit_to_tokenizer(model, tokenizer, images)
        method = vlm_method(method, model)
    model_class = register_custom_model(model) if config.model.builder is not None else None
    new_token_ids = add_new_token_rows(model, tokenizer, config.model)
    if config.data.packing:
        # Under DeepSpeed ZeRO-3 the weights stay partitioned (empty) until the Trainer wraps the
        # model, so the isolation probe cannot run a forward pass yet.
        verify = not is_deepspeed_zero3_enabled()
        attention = enable_packed_attention(model, device=args.device, verify=verify)
        _say(f"packed batches use attention implementation '{attention}'")
    base_dir = None
    if (config.model.init == "random" or config.model.vision is not None) and isinstance(method, LoraMethod):
        # Random or just-assembled base weights exist nowhere else: keep them so the adapter stays usable.
        base_dir = run_dir / "base"
        _save_base(model, tokenizer, base_dir)
    model, counts = prepare_model(
        method, model, new_token_ids=new_token_ids, gradient_checkpointing=bool(args.gradient_checkpointing),
        fused_lora=config.speed.fused_lora,
    )
    plan = plan_speed(
        config.speed, config.train, model,
        tokens_per_micro_batch=args.per_device_train_batch_size * config.data.max_length, device=args.device,
        sharding=(Strategy.from_config(config), Ranks.from_env().world_size),
    )
    plan.apply(args)
    skip_unused_parameter_search(args, model, config.distributed, Ranks.from_env().world_size)
    _say(plan.describe())
    if plan.compiled:
        why = "speed.compile" if config.speed.compile is True else "speed.compile auto: 4-bit weights, every layer recomputed"
        _say(f"torch.compile: {compile_decoder_layers(model)} decoder layers ({why}; the first steps compile)")
    _say(check_before_training(plan, args.device))
    _attach_input_grads_for_checkpointing(model, args)
    _say(f"method {config.method.name}: {counts.describe()}")
    check_disk_space(run_dir, estimate_run_bytes(model, args))
    return model, counts, base_dir, model_class, plan


def _collator(config: Config, args: transformers.TrainingArguments, tokenizer: Any, datasets: Datasets) -> Any:
    if config.data.packing:
        text = PackedCollator()
    else:
        text = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    if datasets.images is None:
        return text
    args.remove_unused_columns = False  # the image paths must reach the collator
    return ImageCollator(text, datasets.images.processor)


def _build_trainer(
    config: Config, args: transformers.TrainingArguments, model: Any, tokenizer: Any,
    datasets: Datasets, callbacks: list[TrainerCallback],
) -> Trainer:
    if isinstance(config.method, PreferenceMethod):
        trainer = build_preference_trainer(config, args, model, tokenizer, datasets, callbacks)
    else:
        trainer = TuneforgeTrainer(
            max_nonfinite_steps=config.guards.max_nonfinite_steps,
            spike_factor=config.guards.spike_factor,
            spike_window=config.guards.spike_window,
            max_rollbacks=config.guards.max_rollbacks,
            model=model,
            args=args,
            train_dataset=datasets.train,
            eval_dataset=datasets.eval,
            data_collator=_collator(config, args, tokenizer, datasets),
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(config.train.optim, args),
        )
    # TrainingProgress replaces transformers' bar and its printed log dicts.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


class _EvaluateAtTrainBegin(TrainerCallback):
    """The evaluation before training, run once `train()` has wrapped the model.

    Under DeepSpeed an evaluation before `train()` wraps the model in an inference engine (no
    optimizer), which `train()` then keeps instead of building its training engine: the first
    backward fails ("'NoneType' object has no attribute 'backward'", accelerate's engine unset).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.eval_loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.eval_loss is None:
            self.eval_loss = self.trainer.evaluate()["eval_loss"]
            _say(f"eval loss before training: {self.eval_loss:.4f}")


def _fit(trainer: Trainer, resume: str | None, has_eval: bool) -> dict[str, Any]:
    """Evaluate, train, evaluate; measure time and peak GPU memory."""
    eval_before = None
    at_begin = None
    if has_eval and resume is None:
        if trainer.is_deepspeed_enabled:
            at_begin = _EvaluateAtTrainBegin(trainer)
            trainer.add_callback(at_begin)
        else:
            eval_before = trainer.evaluate()["eval_loss"]
            _say(f"eval loss before training: {eval_before:.4f}")
    if torch.cuda.is_available():
        reset_peak_memory()
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    if at_begin is not None:
        eval_before = at_begin.eval_loss
    raise_if_preempted(trainer)  # before the final evaluation: the grace period is short
    return {
        "train_seconds": time.perf_counter() - started,
        "peak_gpu_memory_gib": peak_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "train_loss": output.training_loss,
        "eval_loss_before": eval_before,
        "eval_loss_after": trainer.evaluate()["eval_loss"] if has_eval else None,
    }


def train(
    config: str | Path | dict[str, Any] | Config,
    overrides: list[str] | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> RunResult:
    """Fine-tune as the config says and write the run directory.

    Args:
        config: a YAML path, a dict, or a validated `Config`.
        overrides: `section.key=value` strings applied on top.
        callbacks: extra `TrainerCallback`s (tests and integrations).
    """
    config = load_config(config, overrides)
    preflight(config.model)  # before anything is written or loaded
    ranks = Ranks.from_env()
    run_dir = Path(config.output.dir)  # type: ignore[arg-type]
    start_process_group(config.distributed, ranks)
    args = _build_training_arguments(config, run_dir)
    if ranks.is_main:  # one process creates, clears and writes the run directory; the others wait
        prepare_run_dir(config.output)
        resolved = dump_config(config)
        (run_dir / "config.yaml").write_text(resolved, encoding="utf-8")
        _say(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{resolved}")
    barrier()
    resume = find_resume_checkpoint(config.output, run_dir)
    if resume is not None:
        check_resume_layout(resume, config.distributed, ranks.world_size)

    transformers.set_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model)
    datasets = build_run_datasets(
        config, tokenizer,
        # Local rank 0 tokenises; the others wait for its cache entry on a file barrier.
        peers_wait=ranks.world_size > 1 and ranks.local_rank == 0,
        wait_seconds=None if ranks.local_rank == 0 else config.distributed.preprocess_timeout_minutes * 60,
    )
    _log_data(datasets)
    _check_data(config, datasets)
    if resume is not None:
        check_resume_data(resume, datasets.fingerprint, config.output.resume_on_changed_data)

    model, counts, base_dir, model_class, plan = _setup_model(config, args, tokenizer, run_dir, datasets.images)
    metrics_path = run_dir / "metrics.jsonl"
    if resume is not None and ranks.is_main:
        trim_metrics(metrics_path, checkpoint_step(resume))
        _say(f"resuming from {resume}")
    metrics_logger = MetricsLogger(
        metrics_path, flops_per_token=model_flops_per_token(model, config.data.max_length), peak_tflops=matmul_peak_tflops()
    )
    # SIGTERM/SIGUSR1 from a scheduler: checkpoint at the next step end, then TrainingPreempted.
    with install_preemption_handlers() as preemption:
        trainer = _build_trainer(
            config, args, model, tokenizer, datasets,
            [metrics_logger, TrainingProgress(), preemption, *_watchdog(config), *(callbacks or [])],
        )
        report_after_metrics(trainer)
        check_engine(trainer, config.distributed, ranks.world_size)
        keep_gradients_in_buckets(trainer, config.distributed, ranks.world_size)
        layer_checkpointing = plan.layer_checkpointing(args, planned_engine(config.distributed, ranks.world_size), report=_say)
        if layer_checkpointing is not None:
            trainer.add_callback(layer_checkpointing)
        if config.speed.fused_lora:
            # A compiled layer would break its graph at the norm hook's attribute on a tensor.
            trainer.add_callback(FusedLoraActivations(norm_outputs=not plan.compiled))
        trainer.checkpoint_layout = {
            **checkpoint_layout(config.distributed, ranks.world_size), "data_fingerprint": datasets.fingerprint,
        }
        if config.eval.tasks:
            trainer.add_callback(EvalTasksCallback(trainer, config.eval.tasks, datasets.template))
        measured = _fit(trainer, resume, datasets.eval is not None)

    model_dir = _save_final(config, trainer, tokenizer, datasets, run_dir, base_dir, model_class)
    # No rank leaves before the others are done with it: the final gather is asynchronous on NCCL,
    # and a rank that exits with its part still in flight leaves rank 0 waiting for ever.
    barrier()
    result = RunResult(
        run_dir=run_dir,
        model_dir=model_dir,
        global_step=trainer.state.global_step,
        tokens_seen=trainer.state.num_input_tokens_seen - metrics_logger.tokens_at_start,
        parameters=counts,
        resumed_from=resume,
        best_checkpoint=trainer.state.best_model_checkpoint,
        # A sharded model generates only with every rank taking part: samples come from DDP runs.
        samples=_show_samples(config, trainer.model, tokenizer, datasets.template)
        if ranks.is_main and planned_engine(config.distributed, ranks.world_size) == "ddp" else [],
        preference=preference_report(trainer.state.log_history),
        rollbacks=count_rollbacks(trainer),
        **measured,
    )
    if ranks.is_main:
        write_summary(result)
        write_report(run_dir)
        print_summary(result)
    if config.model.init == "random":
        _say(
            "note: this was a randomly initialised demonstration model, not a real one. To fine-tune "
            "a real model, change one line: model.path=<hub id or directory> model.init=pretrained"
        )
    return result


__all__ = ["RunResult", "train"]
