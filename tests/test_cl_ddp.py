"""Data-parallel training: 2 CPU processes (torchrun, gloo) reach the weights of one process on the same global
batch. Tolerance by the project's rule: the DDP run's error against an fp64 single-process run is at most twice
that of the fp32 single-process run."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip")

from _tolerance import assert_close_by_rule
from rank1_cl.config import CLConfig, apply_overrides
from rank1_cl.model import create_clip, prepare_method
from rank1_cl.trainer import run_continual

from rank1_kernels import load_adapters, pool_layers

# Per-sample routing and no dropout: with those a sample's computation does not depend on which rank holds it.
# The AGO term is on (second task), so the activation counts must agree across ranks at every step.
SETTINGS = {
    "model.name": "rank1-tiny-vit", "data.benchmark": "synthetic", "data.tasks": "shapes,colors",
    "data.synthetic_train_per_class": "6", "data.synthetic_test_per_class": "3", "train.iterations": "3",
    "train.batch_size": "8", "train.shots": "4", "train.seed": "5", "pool.routing": "sample", "pool.dropout": "0",
    "train.ago_weight": "50",
}  # fmt: skip


def _config(run_dir, precision):
    config = CLConfig()
    return apply_overrides(config, {**SETTINGS, "model.precision": precision, "run.run_dir": str(run_dir)}).validate()


def _torchrun_train(run_dir, settings):
    """`rank1_cl train` on 2 gloo processes under torchrun, into run_dir."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rank1_cl", "train",
        "--run-dir", str(run_dir), "--no-progress", *[f"--set={key}={value}" for key, value in settings.items()],
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run(command, cwd=run_dir.parent, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, f"torchrun failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"


@pytest.mark.slow
def test_ddp_gloo_two_processes_match_one_process(tmp_path):
    _torchrun_train(tmp_path / "ddp", SETTINGS)
    ddp_state = torch.load(tmp_path / "ddp/checkpoints/task_01_colors/state.pt", weights_only=True)
    assert ddp_state["results"]["world_size"] == 2

    single = run_continual(_config(tmp_path / "single32", "fp32"), progress=False)
    oracle = run_continual(_config(tmp_path / "single64", "fp64"), progress=False)
    single_state = torch.load(tmp_path / "single32/checkpoints/task_01_colors/state.pt", weights_only=True)

    # The summed activation counts (hence the merged experts) are those of the single process, exactly.
    for name, counts in single_state["lifecycle"]["counts_per_task"].items():
        assert torch.equal(ddp_state["lifecycle"]["counts_per_task"][name], counts), f"{name}: activation counts differ"

    # Rebuild the DDP run's merged model from its adapter file (merges replayed onto the same base weights).
    config = _config(tmp_path / "rebuilt", "fp32")
    ddp_model, *_ = create_clip(config.model, seed=config.train.seed)
    prepare_method(ddp_model, config.pool, "pool")
    load_adapters(ddp_model, tmp_path / "ddp/checkpoints/task_01_colors/adapters.safetensors")
    ddp_layers, single_layers, oracle_layers = (dict(pool_layers(m)) for m in (ddp_model, single.model, oracle.model))
    assert len(ddp_layers) == 24
    for name, layer in ddp_layers.items():
        assert layer.merge_sizes.tolist() == [4, 4]
        assert_close_by_rule(layer.weight, single_layers[name].weight, oracle_layers[name].weight, f"{name}.weight")
        assert_close_by_rule(
            layer.merged_B, single_layers[name].merged_B, oracle_layers[name].merged_B, f"{name}.merged_B"
        )


@pytest.mark.slow
def test_ddp_dense_lora_with_a_learned_gate_setting_trains_without_its_routers(tmp_path):
    """Dense LoRA routes nothing (pool_config sets its gate to "none"): with pool.gate=softmax configured, DDP must
    still be told that the routers get no gradient, and they are neither trained nor counted."""
    settings = {**SETTINGS, "data.tasks": "shapes", "train.iterations": "2", "train.method": "lora",
                "pool.gate": "softmax"}  # fmt: skip
    _torchrun_train(tmp_path / "ddp", settings)
    results = torch.load(tmp_path / "ddp/checkpoints/task_00_shapes/state.pt", weights_only=True)["results"]
    model, *_ = create_clip(_config(tmp_path / "count", "fp32").model, seed=5)
    config = apply_overrides(CLConfig(), settings)
    counted = prepare_method(model, config.pool, "lora")
    layers = dict(pool_layers(model))
    assert counted == sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers.values())
    assert results["trainable_parameters"] == counted


class _TwoTowers(torch.nn.Module):
    """A stand-in for CLIP: two linear towers with L2-normalised outputs, and a learned logit scale (trained by
    method "full"; every rank's loss reaches it through the whole global batch)."""

    def __init__(self, dtype):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.image = torch.nn.Linear(6, 4, dtype=dtype)
        self.text = torch.nn.Linear(5, 4, dtype=dtype)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.302585092994046, dtype=dtype))  # scale 10
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))

    def forward(self, images, texts):
        return (torch.nn.functional.normalize(self.image(images), dim=1),
                torch.nn.functional.normalize(self.text(texts), dim=1), self.log_scale.exp())  # fmt: skip


def _global_batch(dtype):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(8, 6, generator=generator, dtype=torch.float64).to(dtype)
    texts = torch.randn(8, 5, generator=generator, dtype=torch.float64).to(dtype)
    return images, texts, torch.tensor([0, 1, 0, 2, 1, 3, 3, 0])


def _gradients(context, dtype):
    from rank1_cl.distributed import wrap_model
    from rank1_cl.trainer import global_batch_loss

    model = _TwoTowers(dtype)
    images, texts, labels = _global_batch(dtype)
    rows = context.local_slice(len(labels))
    # Hold the DDP wrapper until backward is done: its reducer's hooks die with it.
    ddp_model = wrap_model(model, context, find_unused_parameters=False)
    image_features, text_features, logit_scale = ddp_model(images[rows], texts[rows])
    loss, _ = global_batch_loss(image_features, text_features, labels, logit_scale, context)
    loss.backward()
    del ddp_model
    return {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()}


def _gradient_worker(rank, world_size, port, path):
    from rank1_cl.distributed import init_distributed, shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))  # fmt: skip
    context = init_distributed("cpu")
    gradients = _gradients(context, torch.float32)
    if rank == 0:
        torch.save(gradients, path)
    shutdown(context)


def test_ddp_gradient_equals_the_global_batch_gradient(tmp_path):
    """The loss's gradient, averaged by DDP over 2 gloo ranks, is the gradient of one process on the global batch
    (the final-weights test above cannot see a wrong gradient scale: Adam divides it out)."""
    import socket

    import torch.multiprocessing as multiprocessing
    from rank1_cl.distributed import DistContext

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "gradients.pt"
    multiprocessing.spawn(_gradient_worker, args=(2, port, str(path)), nprocs=2, join=True)
    ddp = torch.load(path, weights_only=True)
    single, oracle = _gradients(DistContext(), torch.float32), _gradients(DistContext(), torch.float64)
    for name in oracle:
        assert_close_by_rule(ddp[name], single[name], oracle[name], f"gradient of {name}")
