"""Several processes on CPU (gloo), launched as a user would: `tuneforge train --nproc-per-node 2`.

What is checked: two ranks log the losses of one process with the same global batch; two
"nodes" on localhost do too; gradients are normalised by trained tokens across micro-batches
and ranks (PITFALLS 8); preprocessing longer than the collective timeout still finishes
(PITFALLS 7); a checkpoint written by two processes resumes on one; FSDP, which accelerate
enables on GPUs only, is refused on CPU instead of silently training unsharded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tuneforge
from tests.conftest import build_tiny_llama, successor_rows, write_jsonl
from tuneforge.config.schema import DistributedConfig
from tuneforge.data.cache import DataCache
from tuneforge.errors import ConfigError, DataError, ModelError
from tuneforge.train import train
from tuneforge.train.checkpoints import read_manifest
from tuneforge.train.distributed import (
    DEEPSPEED_DIR,
    check_resume_layout,
    engine_arguments,
    verify_export,
)
from tuneforge.train.launch import (
    expand_nodelist,
    resolve_rendezvous,
    scheduler_rendezvous,
    torchrun_arguments,
)

STEPS = 4


def write_config(tmp_path: Path, model_dir: Path, name: str, data: Path | None = None, **sections) -> Path:
    if data is None:
        data = tmp_path / "train.jsonl"
        if not data.exists():
            write_jsonl(data, successor_rows(64))
    train_args = {
        "learning_rate": 3e-3, "per_device_train_batch_size": 4, "max_steps": STEPS, "logging_steps": 1,
        "save_strategy": "no", "use_cpu": True, **sections.pop("train", {}),
    }
    config = {
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}],
                 "max_length": 32},
        "train": train_args,
        "output": {"dir": str(tmp_path / name)},
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def tuneforge_train(*arguments: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tuneforge.__file__).parents[1]), str(cwd or "")]))
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.cli.main", "train", *arguments],
        check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, tiny_model_dir) -> list[float]:
    """The reference: one process, micro-batch 8 (the global batch of 2 ranks x 4)."""
    tmp_path = tmp_path_factory.mktemp("one-process")
    result = train(str(write_config(tmp_path, tiny_model_dir, "run", train={"per_device_train_batch_size": 8})))
    assert result.global_step == STEPS
    return losses(result.run_dir)


def test_two_ranks_log_the_losses_of_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, one_process_losses):
    config = write_config(tmp_path, tiny_model_dir, "run", train={"save_strategy": "steps", "save_steps": 2})
    finished = tuneforge_train(str(config), "--nproc-per-node", "2")
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(one_process_losses, rel=1e-5)
    # Only rank 0 reports and writes; every checkpoint says two DDP processes wrote it.
    assert finished.stdout.count("[tuneforge] run summary") == 1
    assert finished.stdout.count("resolved config (saved to") == 1
    assert read_manifest(tmp_path / "run" / "checkpoint-2")["world_size"] == 2
    assert read_manifest(tmp_path / "run" / "checkpoint-2")["engine"] == "ddp"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_two_nodes_on_localhost_log_the_losses_of_one_process(tmp_path, tiny_model_dir, one_process_losses):
    config = write_config(tmp_path, tiny_model_dir, "run")
    env = dict(os.environ, PYTHONPATH=str(Path(tuneforge.__file__).parents[1]))
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "tuneforge.cli.main", "train", str(config), "--nproc-per-node", "1",
             "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert losses(tmp_path / "run") == pytest.approx(one_process_losses, rel=1e-5)
    assert "[tuneforge] run summary" in outputs[0] and "[tuneforge] run summary" not in outputs[1]


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_losses(tmp_path, tiny_model_dir, one_process_losses):
    two = write_config(tmp_path, tiny_model_dir, "run", train={"max_steps": 2, "save_strategy": "steps", "save_steps": 2})
    first = tuneforge_train(str(two), "--nproc-per-node", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # The same global batch on one process: 8 per device, as 2 ranks x 4 had.
    one = write_config(tmp_path, tiny_model_dir, "run", train={"per_device_train_batch_size": 8})
    resumed = tuneforge_train(str(one), "output.resume=auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {tmp_path / 'run' / 'checkpoint-2'}" in resumed.stdout
    # The schedule of a 2-step run ends at step 2, so compare the steps both runs share.
    assert losses(tmp_path / "run")[:2] == pytest.approx(one_process_losses[:2], rel=1e-5)
    assert len(losses(tmp_path / "run")) == STEPS


def test_gradients_are_normalised_by_trained_tokens_across_micro_batches_and_ranks(tmp_path, tokenizer_dir):
    """PITFALLS 8: one SGD step (lr 1, no clipping) moves the weights by minus the gradient; batch
    8 x accumulation 1, batch 1 x accumulation 8 and 2 ranks x batch 4 must move them equally."""
    model_dir = build_tiny_llama(tmp_path / "fp64", tokenizer_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({name: value.double() for name, value in weights.items()}, str(model_dir / "model.safetensors"))
    config_file = model_dir / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "float64"}))
    # Replies of 1 to 12 words: a per-micro-batch mean would weight the short ones up.
    rows = [{"question": f"count to {n}", "answer": " ".join(["word"] * n)} for n in (1, 12, 2, 9, 3, 7, 1, 5)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    sgd = {"optim": "sgd", "learning_rate": 1.0, "max_steps": 1, "max_grad_norm": 0.0, "lr_scheduler_type": "constant",
           "weight_decay": 0.0}
    runs = {
        "batch8": ({"per_device_train_batch_size": 8}, []),
        "accumulate8": ({"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8}, []),
        "ranks2": ({"per_device_train_batch_size": 4}, ["--nproc-per-node", "2"]),
    }
    moved = {}
    for name, (batching, launch) in runs.items():
        config = write_config(tmp_path, model_dir, name, data=data, train={**sgd, **batching})
        if launch:
            finished = tuneforge_train(str(config), *launch)
            assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        else:  # one process: in this one, which saves a start-up
            train(str(config))
        after = load_file(str(tmp_path / name / "model" / "model.safetensors"))
        assert after["lm_head.weight"].dtype == torch.float64
        moved[name] = {key: after[key] - weights[key].double() for key in after}
    for name in ("accumulate8", "ranks2"):
        for key, step in moved["batch8"].items():
            assert torch.allclose(moved[name][key], step, rtol=1e-9, atol=1e-12), (name, key)
    assert any(step.abs().max() > 1e-4 for step in moved["batch8"].values())  # the step did move them


def test_preprocessing_longer_than_the_collective_timeout_still_finishes(tmp_path, tiny_model_dir):
    """PITFALLS 7: rank 0 tokenises for longer than distributed.timeout_minutes; rank 1 waits on the
    cache's file barrier, not in a collective, so the run completes."""
    (tmp_path / "slow_rows.py").write_text(
        "import os, time\n"
        "def load_rows(seconds):\n"
        "    if os.environ.get('RANK') == '0':\n"
        "        time.sleep(seconds)  # a slow tokenisation on the rank that fills the cache\n"
        "    return [{'question': f'after {n}', 'answer': str(n + 1)} for n in range(32)]\n"
    )
    # 12 s: long enough for the ordinary gaps between collectives on a loaded 2-core machine (6 s
    # was not, in CI), shorter than rank 0's preprocessing (15 s of sleep, read twice: key and rows).
    config = write_config(tmp_path, tiny_model_dir, "run", distributed={"timeout_minutes": 0.2})
    settings = yaml.safe_load(config.read_text())
    settings["data"]["datasets"][0] = {"source": {"_target_": "slow_rows.load_rows", "seconds": 15},
                                       "prompt_fields": ["question"], "response_field": "answer"}
    settings["data"]["cache_dir"] = str(tmp_path / "cache")
    config.write_text(yaml.safe_dump(settings))
    finished = tuneforge_train(str(config), "--nproc-per-node", "2", cwd=tmp_path)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert len(losses(tmp_path / "run")) == STEPS


def test_fsdp_on_cpu_is_refused_instead_of_training_unsharded(tmp_path, tiny_model_dir):
    """accelerate 1.15 enables FSDP for GPU process groups only (its MULTI_CPU type drops the
    plugin), so FSDP cannot run on CPU; the run must say so, not train every rank unsharded."""
    config = write_config(tmp_path, tiny_model_dir, "run", distributed={"strategy": "fsdp"})
    finished = tuneforge_train(str(config), "--nproc-per-node", "2")
    assert finished.returncode == 2
    assert "FSDP is not available on this cpu process group" in finished.stderr
    assert "distributed.strategy=fsdp" in finished.stderr


def test_engine_arguments_are_transformers_own_fields():
    assert engine_arguments(DistributedConfig(), world_size=2) == {"ddp_timeout": 1800}
    fsdp = engine_arguments(DistributedConfig(strategy="fsdp", reshard_after_forward=False, timeout_minutes=5), 2)
    assert fsdp == {
        "ddp_timeout": 300, "fsdp": True,
        "fsdp_config": {"version": 2, "reshard_after_forward": False, "cpu_offload": False,
                        "state_dict_type": "SHARDED_STATE_DICT"},
    }
    assert "fsdp" not in engine_arguments(DistributedConfig(strategy="fsdp"), world_size=1)  # nothing to shard over
    assert engine_arguments(DistributedConfig(mixed_precision="bf16"), 2)["bf16"] is True
    zero3 = engine_arguments(DistributedConfig(strategy="deepspeed", offload_optimizer=True, offload_params=True), 2)
    zero = zero3["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert zero3["deepspeed"]["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam steps offloaded state


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_deepspeed_files_match_their_stage_and_leave_batch_sizes_to_the_trainer(stage):
    config = json.loads((DEEPSPEED_DIR / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"  # filled from the train section, so the two never disagree
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"


def test_a_users_deepspeed_file_is_used_as_is(tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    section = DistributedConfig(strategy="deepspeed", deepspeed_config=str(own))
    assert engine_arguments(section, 2)["deepspeed"] == json.loads(own.read_text())
    with pytest.raises(ValueError, match="set ZeRO stage and offload in that file"):
        DistributedConfig(strategy="deepspeed", deepspeed_config=str(own), zero_stage=3)
    own.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        engine_arguments(section, 2)


def test_resume_on_another_process_count_is_refused_only_for_deepspeed(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "tuneforge_checkpoint.json").write_text(json.dumps({"step": 4, "world_size": 2, "engine": "deepspeed", "files": {}}))
    with pytest.raises(ConfigError, match="written by 2 processes cannot be resumed on 4") as refused:
        check_resume_layout(str(checkpoint), DistributedConfig(strategy="deepspeed"), world_size=4)
    assert "ds_to_universal" in refused.value.hint
    check_resume_layout(str(checkpoint), DistributedConfig(strategy="deepspeed"), world_size=2)
    with pytest.raises(ConfigError, match="written by deepspeed"):
        check_resume_layout(str(checkpoint), DistributedConfig(strategy="ddp"), world_size=2)
    (checkpoint / "tuneforge_checkpoint.json").write_text(json.dumps({"step": 4, "world_size": 4, "engine": "fsdp", "files": {}}))
    check_resume_layout(str(checkpoint), DistributedConfig(strategy="fsdp"), world_size=2)  # DCP reshards


def test_a_waiting_rank_raises_the_builders_error_or_times_out(tmp_path, tokenizer, tmp_path_factory):
    from tuneforge.config.schema import DataConfig

    data = write_jsonl(tmp_path / "rows.jsonl", successor_rows(4))
    config = DataConfig(datasets=[{"path": str(data)}], cache_dir=str(tmp_path / "cache"))
    cache = DataCache(config, tokenizer, seed=0)
    with pytest.raises(DataError, match="waited 0.0 minutes"):
        cache.wait(timeout_seconds=0.3, poll_seconds=0.05)
    cache.mark_failed(DataError("row 3 has no 'output'"))
    with pytest.raises(DataError, match="preprocessing the data failed: row 3 has no 'output'"):
        cache.wait(timeout_seconds=30)
    cache.clear_failure()
    assert not cache.failure_marker.exists()


def test_an_export_with_an_empty_tensor_fails_verification(tmp_path):
    save_file({"model.embed.weight": torch.ones(4, 2)}, str(tmp_path / "model.safetensors"))
    verify_export(tmp_path)
    save_file({"model.embed.weight": torch.ones(4, 2), "lm_head.weight": torch.empty(0)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="'lm_head.weight' in model.safetensors is empty"):
        verify_export(tmp_path)
    with pytest.raises(ModelError, match="no safetensors weights"):
        verify_export(tmp_path / "nothing")


def test_rendezvous_comes_from_slurm_and_pbs(tmp_path, monkeypatch):
    assert expand_nodelist("gpu[08-10,12],login1") == ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]
    slurm = scheduler_rendezvous({"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "a[3-4]"})
    assert (slurm.nnodes, slurm.node_rank, slurm.master_addr, slurm.master_port) == (2, 1, "a3", 29500)
    nodefile = tmp_path / "nodes"
    nodefile.write_text("g0001.abci.local\ng0001.abci.local\ng0002.abci.local\n")
    abci = scheduler_rendezvous({"PBS_NODEFILE": str(nodefile), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"})
    assert (abci.nnodes, abci.node_rank, abci.master_addr) == (2, 1, "g0001.abci.local")
    monkeypatch.setattr(socket, "gethostname", lambda: "g0002")
    pbs = scheduler_rendezvous({"PBS_NODEFILE": str(nodefile), "MASTER_PORT": "6000"})
    assert (pbs.nnodes, pbs.node_rank, pbs.master_port) == (2, 1, 6000)
    assert scheduler_rendezvous({}) is None
    # Flags win over the scheduler; several nodes with nothing to go on is an error.
    assert resolve_rendezvous(None, 0, "10.0.0.1", None, {"SLURM_NNODES": "2", "SLURM_NODEID": "1"}).node_rank == 0
    with pytest.raises(ConfigError, match="2 nodes need this node's rank"):
        resolve_rendezvous(2, None, None, None, {})


def test_one_node_launches_standalone_and_several_name_the_rendezvous():
    one = torchrun_arguments("2", resolve_rendezvous(None, None, None, None, {}), ["tuneforge.cli.main", "train", "c.yaml"])
    assert one[:5] == ["--nproc-per-node", "2", "--standalone", "--nnodes", "1"]
    assert one[-4:] == ["-m", "tuneforge.cli.main", "train", "c.yaml"]
    two = torchrun_arguments("gpu", resolve_rendezvous(2, 1, "node0", 6001, {}), ["m"])
    assert two[2:10] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "node0", "--master-port", "6001"]
    assert "--max-restarts" in two and two[two.index("--max-restarts") + 1] == "0"


def _worker_with_rank(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the launched worker process holding RANK=`rank`, among the launcher's descendants."""
    pending, seen = [launcher.pid], set()
    while pending:
        pid = pending.pop()
        seen.add(pid)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher.pid and f"RANK={rank}".encode() in environ:
            return pid
        pending += [int(child) for child in children if int(child) not in seen]
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, tiny_model_dir):
    import signal
    import time

    config = write_config(tmp_path, tiny_model_dir, "run", train={"max_steps": 400})
    # PYTHONFAULTHANDLER: a hang is reported with every worker thread's stack (SIGABRT below).
    env = dict(os.environ, PYTHONPATH=str(Path(tuneforge.__file__).parents[1]), PYTHONFAULTHANDLER="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli.main", "train", str(config), "--nproc-per-node", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline, "training ended or stalled before the signal"
        time.sleep(0.05)
    worker = _worker_with_rank(launcher, 1)
    assert worker is not None, "no worker process with RANK=1"
    workers = [_worker_with_rank(launcher, 0), worker]
    os.kill(worker, signal.SIGTERM)  # only rank 1 hears it: rank 0 learns through the all-reduce
    try:
        output, _ = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        for pid in workers:  # faulthandler prints where each worker is stuck, then they end
            if pid is not None:
                os.kill(pid, signal.SIGABRT)
        output, _ = launcher.communicate(timeout=60)
        pytest.fail(f"the ranks did not stop within 240 s of the signal; their stacks:\n{output[-12000:]}")
    assert launcher.returncode == 0, output[-3000:]
    stopped = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert 3 <= stopped < 400
    assert (tmp_path / "run" / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert read_manifest(tmp_path / "run" / f"checkpoint-{stopped}")["world_size"] == 2
    assert output.count(f"stopped by SIGTERM at step {stopped}") >= 1
    assert not (tmp_path / "run" / "model").exists()


def test_a_worker_process_runs_its_exit_hooks_and_ends_without_interpreter_teardown():
    """`exit_process`: exit hooks (wandb, MLflow) run, then the process ends with the code given,
    before the interpreter would destroy torch's process group (which can hang or abort)."""
    script = (
        "import atexit, os\n"
        "os.environ['WORLD_SIZE'] = '2'\n"
        "atexit.register(lambda: print('exit hook ran', flush=True))\n"
        "class Teardown:\n"
        "    def __del__(self):\n"
        "        print('teardown ran', flush=True)\n"
        "kept = Teardown()\n"
        "from tuneforge.cli.main import exit_process\n"
        "exit_process(3)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(tuneforge.__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "exit hook ran" in proc.stdout and "teardown ran" not in proc.stdout


def test_ddp_skips_the_unused_parameter_search_only_where_every_trained_parameter_gets_a_gradient(tmp_path):
    """The Trainer has DDP search for unused parameters whenever checkpointing is off (a walk of
    the autograd graph every step). Dense causal LMs turn it off; MoE and vision-language models,
    where a step can leave experts or the vision tower without a gradient, keep it."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, MixtralConfig, TrainingArguments

    from tuneforge.config.schema import DistributedConfig
    from tuneforge.train.distributed import skip_unused_parameter_search

    def decided(config, strategy="ddp", world_size=2, **train):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **train)
        skip_unused_parameter_search(args, SimpleNamespace(config=config), DistributedConfig(strategy=strategy), world_size)
        return args.ddp_find_unused_parameters

    dense = LlamaConfig()
    assert decided(dense) is False
    assert decided(MixtralConfig()) is None  # the Trainer's default stays
    assert decided(SimpleNamespace(vision_config=object())) is None
    assert decided(dense, ddp_find_unused_parameters=True) is True  # the user's setting wins
    assert decided(dense, strategy="fsdp") is None
    assert decided(dense, world_size=1) is None


def test_ddp_gradients_are_views_into_the_all_reduce_buckets():
    """The Trainer's DDP keeps every gradient twice (the gradient and its bucket's copy); the
    flag goes on the DDP settings accelerate wraps the model with, beside the Trainer's own."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedDataParallelKwargs

    from tuneforge.train.distributed import keep_gradients_in_buckets

    def ddp_kwargs(handler, strategy="ddp", world_size=2, engine=False):
        trainer = SimpleNamespace(
            accelerator=SimpleNamespace(ddp_handler=handler), is_deepspeed_enabled=engine, is_fsdp_enabled=False
        )
        keep_gradients_in_buckets(trainer, DistributedConfig(strategy=strategy), world_size)
        handler = trainer.accelerator.ddp_handler
        return handler.to_kwargs() if handler is not None else None

    from_trainer = DistributedDataParallelKwargs(find_unused_parameters=True, bucket_cap_mb=50)
    assert ddp_kwargs(from_trainer) == {"find_unused_parameters": True, "bucket_cap_mb": 50, "gradient_as_bucket_view": True}
    assert ddp_kwargs(None) == {"gradient_as_bucket_view": True}
    assert ddp_kwargs(None, world_size=1) is None
    assert ddp_kwargs(None, strategy="deepspeed", engine=True) is None


def test_a_two_rank_lora_run_with_merge_is_merged_once_by_rank_0(tmp_path, tiny_model_dir):
    """`method.merge: true` ran the merge on every rank: under DDP both wrote the same folder
    ("Unrecognized model in .../tuneforge_partial_*"), under ZeRO-3 each loaded the base
    partitioned. Rank 0 alone merges now."""
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, tiny_model_dir, "merged", method={"name": "lora", "r": 4, "merge": True})
    finished = tuneforge_train(str(config), "--nproc-per-node", "2")
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert finished.stdout.count("merged weights in") == 1
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged" / "merged"))
    assert not any("lora_" in name for name in merged.state_dict())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_die_with_a_torchrun_launcher_killed_by_sigkill(tmp_path):
    """torchrun starts workers in sessions of their own: SIGKILL of the launcher left them
    training on, and a resumed run read a checkpoint the orphans were rotating away."""
    import signal
    import subprocess

    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, pathlib, time\n"
        "from tuneforge.train.distributed import die_with_launcher\n"
        "die_with_launcher()\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "0", str(script)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker = int(pid_file.read_text())

    def running() -> bool:  # a killed orphan may linger as a zombie until its new parent reaps it
        stat = Path(f"/proc/{worker}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group: the worker is not in it
    launcher.wait()
    try:
        deadline = time.monotonic() + 10
        while running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(), "the worker outlived its launcher"
    finally:
        if running():
            os.kill(worker, signal.SIGKILL)
