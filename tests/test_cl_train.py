"""rank1_cl end to end on the tiny CLIP (CPU): a 2-task run, resume equality, the parameter report, the CLI."""

import io
import json
import os

import pytest
import torch

pytest.importorskip("open_clip")

from _tolerance import assert_close_by_rule
from rank1_cl.__main__ import main
from rank1_cl.config import CLConfig, apply_overrides
from rank1_cl.metrics import summarize
from rank1_cl.model import parameter_report
from rank1_cl.trainer import run_continual

from rank1_kernels import pool_layers


def tiny_config(run_dir, **overrides) -> CLConfig:
    config = CLConfig()
    settings = {
        "model.name": "rank1-tiny-vit", "data.benchmark": "synthetic", "data.tasks": ["shapes", "colors"],
        "data.synthetic_train_per_class": 6, "data.synthetic_test_per_class": 4, "train.iterations": 4,
        "train.batch_size": 8, "train.shots": 4, "train.seed": 3, "run.run_dir": str(run_dir),
    }  # fmt: skip
    settings.update(overrides)
    return apply_overrides(config, settings).validate()


def pool_state(model):
    return {
        name: (layer.weight.detach().clone(), layer.merged_B.detach().clone()) for name, layer in pool_layers(model)
    }


def test_xtail_classifies_over_every_name_through_one_template(tmp_path):
    """X-TAIL's classifier: each distinct class name once, through eval.xtail_template (the per-task ensembles
    name their domain); MTIL's: each task's own template ensemble."""
    from rank1_cl.data import synthetic_tasks
    from rank1_cl.distributed import DistContext
    from rank1_cl.model import create_clip
    from rank1_cl.trainer import evaluate

    config = tiny_config(tmp_path, **{"eval.xtail_template": "an image of {}, seen anywhere."})
    model, _, preprocess, tokenizer = create_clip(config.model)
    tasks = synthetic_tasks(["shapes", "colors"], image_size=32, train_per_class=1, test_per_class=2, seed=0)
    tasks[1].class_names[0] = tasks[0].class_names[0]  # a name two domains share is one class of the union
    prompts = []

    def recording_tokenizer(texts):
        prompts.extend(texts)
        return tokenizer(texts)

    rows = evaluate(model, tasks, recording_tokenizer, config, DistContext())
    union = list(dict.fromkeys(name for task in tasks for name in task.class_names))
    per_task = [template.format(name) for task in tasks for name in task.class_names for template in task.templates]
    assert prompts == per_task + [f"an image of {name}, seen anywhere." for name in union]
    assert len(rows["mtil"]) == len(rows["xtail"]) == 2


def test_openai_weights_get_quick_gelu(monkeypatch):
    """open_clip 3 builds ViT-B-16 with nn.GELU even for OpenAI's weights (trained with QuickGELU), with a warning
    only: create_clip asks for QuickGELU whenever the tag's weights need it."""
    import open_clip

    from rank1_cl import model as cl_model

    assert cl_model.needs_quick_gelu(open_clip, "ViT-B-16", "openai")
    assert not cl_model.needs_quick_gelu(open_clip, "ViT-B-16", "laion2b_s34b_b88k")
    assert not cl_model.needs_quick_gelu(open_clip, "ViT-B-16", None)
    assert not cl_model.needs_quick_gelu(open_clip, "ViT-B-16", "/weights/clip.safetensors")
    calls = []

    def create(name, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop before any download")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    config = CLConfig().model
    config.name, config.pretrained = "ViT-B-16", "openai"
    with pytest.raises(RuntimeError, match="stop before any download"):
        cl_model.create_clip(config)
    assert calls[0]["force_quick_gelu"] is True


def test_two_task_run_end_to_end(tmp_path):
    output = run_continual(tiny_config(tmp_path), progress=False)
    results = output.results
    mtil, xtail = results["matrices"]["mtil"], results["matrices"]["xtail"]
    assert len(mtil) == len(xtail) == 2 and all(len(row) == 2 for row in mtil + xtail)
    assert all(0.0 <= value <= 1.0 for row in mtil + xtail for value in row)
    # Every pool layer merged its top-4 experts after each task, and a fresh pool follows each merge.
    layers = list(pool_layers(output.model))
    assert len(layers) == 2 * 2 * 6  # 2 towers x 2 blocks x (q, k, v, out, c_fc, c_proj)
    for _, layer in layers:
        assert layer.merge_sizes.tolist() == [4, 4]
        assert layer.merged_B.abs().sum() > 0, "the merged experts were never trained"
        assert not layer.lora_B.any()
    assert results["trainable_parameters"] == sum(
        layer.lora_A.numel() + layer.lora_B.numel() + layer.router.weight.numel() + layer.router.bias.numel()
        for _, layer in layers
    )
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"]["mtil"] == pytest.approx(summarize(mtil))
    for name in ("accuracy_mtil.csv", "accuracy_mtil.png", "accuracy_xtail.csv", "accuracy_xtail.png"):
        assert (tmp_path / name).stat().st_size > 0
    task_dir = tmp_path / "checkpoints" / "task_01_colors"
    assert sorted(os.listdir(task_dir)) == ["adapters.safetensors", "state.pt", "task_pool.safetensors"]
    state = torch.load(task_dir / "state.pt", weights_only=True)  # loadable without executing code
    assert state["finished_tasks"] == 2 and state["results"]["matrices"]["mtil"] == mtil
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["directory"] == "task_01_colors"


def test_resume_gives_the_uninterrupted_run(tmp_path):
    # Dropout and batch routing on (the defaults): the RNG states and data order must be restored exactly.
    whole = run_continual(tiny_config(tmp_path / "whole"), progress=False)
    first = run_continual(tiny_config(tmp_path / "killed", **{"run.stop_after_task": 1}), progress=False)
    assert len(first.results["matrices"]["mtil"]) == 1
    resumed = run_continual(tiny_config(tmp_path / "killed", **{"run.resume": True}), progress=False)
    assert resumed.results["matrices"] == whole.results["matrices"]
    expected, actual = pool_state(whole.model), pool_state(resumed.model)
    for name, (weight, merged_B) in expected.items():
        assert torch.equal(actual[name][0], weight), f"{name}: merged weight differs after resuming"
        assert torch.equal(actual[name][1], merged_B), f"{name}: merge history differs after resuming"


def test_resume_refuses_a_changed_config(tmp_path):
    run_continual(tiny_config(tmp_path, **{"run.stop_after_task": 1}), progress=False)
    with pytest.raises(ValueError, match="train.lr"):
        run_continual(tiny_config(tmp_path, **{"run.resume": True, "train.lr": 1e-3}), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_continual(tiny_config(tmp_path), progress=False)
    # The config is checked before the model files are read: a changed method is named as such, not reported as a
    # missing model.safetensors.
    with pytest.raises(ValueError, match="train.method: 'pool' -> 'full'"):
        run_continual(tiny_config(tmp_path, **{"run.resume": True, "train.method": "full"}), progress=False)


def test_a_second_run_on_a_run_directory_in_use_is_refused(tmp_path):
    """Two runs on one directory overwrote each other's checkpoints and results; the first holds a lock now."""
    from rank1_cl.checkpoint import RunDirectoryInUse, lock_run_directory, unlock_run_directory

    held = lock_run_directory(str(tmp_path))
    open_descriptors = len(os.listdir("/proc/self/fd"))
    try:
        for settings in ({}, {"run.resume": True}):
            with pytest.raises(RunDirectoryInUse, match=f"in use by another run \\(pid {os.getpid()}\\)"):
                run_continual(tiny_config(tmp_path, **settings), progress=False)
    finally:
        unlock_run_directory(held)
    assert not (tmp_path / "checkpoints").exists()
    assert len(os.listdir("/proc/self/fd")) <= open_descriptors, "a refusal must not leak the lock's descriptor"
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(OSError, match="cannot be written"):
        run_continual(tiny_config(file / "run"), progress=False)


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="rank1_cl"):
        output = run_continual(tiny_config(tmp_path, **{"run.stop_after_task": 1}), progress=False)
    assert len(output.results["matrices"]["mtil"]) == 1 and "has no file locks" in caplog.text


def test_results_are_written_after_every_task_and_an_earlier_run_is_never_overwritten(tmp_path, monkeypatch):
    import rank1_cl.trainer as trainer

    train_task = trainer.train_task

    def stopped_in_the_second_task(*args, **kwargs):
        if args[3] == 1:  # task_index: the run dies here, before its end-of-run write
            raise KeyboardInterrupt
        return train_task(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_task", stopped_in_the_second_task)
    with pytest.raises(KeyboardInterrupt):
        run_continual(tiny_config(tmp_path, **{"run.checkpoints": False}), progress=False)
    monkeypatch.setattr(trainer, "train_task", train_task)
    written = json.loads((tmp_path / "results.json").read_text())
    assert len(written["matrices"]["mtil"]) == 1 and written["metrics"]["mtil"]["complete"] is False
    assert (tmp_path / "accuracy_mtil.csv").exists()
    with pytest.raises(FileExistsError, match="holds an earlier run"):  # results.json, even without checkpoints
        run_continual(tiny_config(tmp_path, **{"run.checkpoints": False}), progress=False)
    with pytest.raises(FileExistsError, match="a run without checkpoints .* cannot be resumed"):
        run_continual(tiny_config(tmp_path, **{"run.resume": True}), progress=False)


def test_resume_without_latest_json_and_from_damaged_checkpoints(tmp_path):
    """latest.json gone (deleted, or a crash before the first one): the last task directory with a state.pt is
    resumed, not the run started over on top of it. Damaged files are refused naming the file and the way out,
    and leftover temporaries of a killed write are removed."""
    whole = run_continual(tiny_config(tmp_path / "whole"), progress=False)
    run_dir = tmp_path / "killed"
    run_continual(tiny_config(run_dir, **{"run.stop_after_task": 1}), progress=False)
    checkpoint_dir = run_dir / "checkpoints"
    task_dir = checkpoint_dir / "task_00_shapes"
    pristine = {path.name: path.read_bytes() for path in task_dir.iterdir()}
    latest = (checkpoint_dir / "latest.json").read_bytes()

    (checkpoint_dir / "latest.json").write_text('{"finished_tasks": 1}')
    with pytest.raises(ValueError, match=r"latest.json is damaged \(KeyError"):
        run_continual(tiny_config(run_dir, **{"run.resume": True}), progress=False)
    (task_dir / "state.pt").write_bytes(pristine["state.pt"][:1000])
    (checkpoint_dir / "latest.json").write_bytes(latest)
    with pytest.raises(ValueError, match="state.pt is unreadable"):
        run_continual(tiny_config(run_dir, **{"run.resume": True}), progress=False)
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"finished_tasks": 1, "rng": RunsCode()}, task_dir / "state.pt")
    with pytest.raises(ValueError, match="state.pt is unreadable"):
        run_continual(tiny_config(run_dir, **{"run.resume": True}), progress=False)
    assert not marker.exists(), "loading a checkpoint must never execute code from it"
    state = torch.load(io.BytesIO(pristine["state.pt"]), weights_only=True)
    torch.save({key: value for key, value in state.items() if key != "rng"}, task_dir / "state.pt")
    with pytest.raises(ValueError, match="is not a run's state"):
        run_continual(tiny_config(run_dir, **{"run.resume": True}), progress=False)
    (task_dir / "state.pt").write_bytes(pristine["state.pt"])
    (task_dir / "adapters.safetensors").write_bytes(pristine["adapters.safetensors"][:100])
    with pytest.raises(ValueError, match="adapters.safetensors is unreadable"):
        run_continual(tiny_config(run_dir, **{"run.resume": True}), progress=False)

    (task_dir / "adapters.safetensors").write_bytes(pristine["adapters.safetensors"])
    (checkpoint_dir / "latest.json").unlink()
    (checkpoint_dir / ".tmp-0123456789abcdef-latest.json").write_text("{")
    (run_dir / "notes").mkdir()  # a run directory may hold other things: only the folders a run writes are cleaned
    (run_dir / "notes" / ".tmp-0123456789abcdef-mine.txt").write_text("kept")
    resumed = run_continual(tiny_config(run_dir, **{"run.resume": True}), progress=False)
    assert resumed.results["matrices"] == whole.results["matrices"]
    assert not list(checkpoint_dir.glob(".tmp-*")) and (run_dir / "notes" / ".tmp-0123456789abcdef-mine.txt").exists()


def test_resume_refuses_other_base_weights_under_the_same_name(tmp_path):
    """model.pretrained names a file (or tag) whose weights may have changed since (the demo, run again, pre-trains
    into the same path): the recorded merges belong to the old weights."""
    from rank1_cl.checkpoint import base_fingerprint
    from rank1_cl.model import create_clip

    config = tiny_config(tmp_path, **{"run.stop_after_task": 1})
    same = [base_fingerprint(create_clip(config.model, seed=3)[0]) for _ in range(2)]
    assert same[0] == same[1] != base_fingerprint(create_clip(config.model, seed=4)[0])
    run_continual(config, progress=False)
    state_path = tmp_path / "checkpoints" / "task_00_shapes" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["base_fingerprint"] == same[0]
    torch.save({**state, "base_fingerprint": "0" * 64}, state_path)
    with pytest.raises(ValueError, match="base model's weights differ"):
        run_continual(tiny_config(tmp_path, **{"run.resume": True}), progress=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [({"train.ago_weight": float("nan")}, "train.ago_weight=nan: expected a finite number"),
     ({"train.lr": float("inf")}, "train.lr=inf: expected a finite number"),
     ({"model.device": "gpu"}, "model.device='gpu' is not a device")],
)  # fmt: skip
def test_config_refuses_non_finite_numbers_and_unknown_devices(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(CLConfig(), {"data.benchmark": "synthetic", **override}).validate()


@pytest.mark.slow
def test_compiled_training_traces_once_and_trains_as_eager_does(tmp_path):
    """train.compile: one graph for the whole training forward (pool layers, routing, counting, text-routing hooks),
    kept across steps and tasks (merges and fresh pools change no guard), and the same training as eager by the
    tolerance rule. Per-sample routing and no dropout, so that rounding cannot change an expert choice or a mask."""
    from torch._dynamo.utils import counters

    settings = {"pool.routing": "sample", "pool.dropout": 0.0, "run.checkpoints": False, "train.ago_weight": 50.0}
    torch._dynamo.reset()
    counters.clear()
    compiled = run_continual(tiny_config(tmp_path / "compiled", **settings, **{"train.compile": True}), progress=False)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    eager = run_continual(tiny_config(tmp_path / "eager", **settings), progress=False)
    oracle = run_continual(tiny_config(tmp_path / "fp64", **settings, **{"model.precision": "fp64"}), progress=False)
    layers = [dict(pool_layers(run.model)) for run in (compiled, eager, oracle)]
    for name, layer in layers[0].items():
        assert_close_by_rule(layer.weight, layers[1][name].weight, layers[2][name].weight, f"{name}.weight")


@pytest.mark.gpu
def test_resume_on_gpu(tmp_path):
    """Generator states are restored on the CPU whatever device the run trains on (they were loaded onto the GPU,
    which torch.set_rng_state refuses). Bit equality with an uninterrupted run is the CPU test's: GPU kernels
    outside this package need not be run-to-run deterministic."""
    run_continual(tiny_config(tmp_path, **{"model.device": "cuda", "run.stop_after_task": 1}), progress=False)
    resumed = run_continual(tiny_config(tmp_path, **{"model.device": "cuda", "run.resume": True}), progress=False)
    second_row = resumed.results["matrices"]["mtil"][1]  # trained after the resume, on the GPU
    assert len(second_row) == 2 and all(0.0 <= value <= 1.0 for value in second_row)
    assert all(layer.merge_sizes.tolist() == [4, 4] for _, layer in pool_layers(resumed.model))


def test_resume_allows_another_worker_count_only_without_augmentation():
    """Workers do not change the computation, unless random augmentation draws from them instead of the main
    process's generator."""
    from rank1_cl.checkpoint import check_resumable

    def config(**overrides):
        return apply_overrides(CLConfig(), overrides).to_dict()

    check_resumable(config(), config(**{"data.num_workers": 4}))
    augmented = {"data.train_augment": True}
    with pytest.raises(ValueError, match="data.num_workers: 0 -> 4"):
        check_resumable(config(**augmented), config(**augmented, **{"data.num_workers": 4}))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_run(tmp_path, method):
    config = tiny_config(tmp_path, **{"train.method": method, "train.iterations": 2, "run.checkpoints": False,
                                      "data.tasks": ["digits"]})  # fmt: skip
    output = run_continual(config, progress=False)
    assert len(output.results["matrices"]["mtil"]) == 1
    if method == "lora":
        assert all(layer.merge_sizes.tolist() == [12] for _, layer in pool_layers(output.model))
    else:
        assert not list(pool_layers(output.model))
        assert output.results["trainable_parameters"] == sum(p.numel() for p in output.model.parameters())


def test_parameter_report_reproduces_the_paper():
    report = parameter_report("ViT-B-16")
    assert report["pool_layers"] == 144
    assert report["trainable_with_routers"] == 4_978_368
    assert report["trainable_without_routers"] == 3_317_760
    assert round(100 * (1 - report["fraction_of_full"]), 1) == 96.7


def test_cli_params_and_errors(tmp_path, capsys):
    assert main(["params", "--model", "ViT-B-16"]) == 0
    assert "4,978,368" in capsys.readouterr().out
    assert main(["train", "--benchmark", "mtil", "--run-dir", str(tmp_path)]) == 2
    assert "needs data.data_root" in capsys.readouterr().err
    assert main(["train", "--benchmark", "mtil", "--data-root", str(tmp_path), "--model", "rank1-tiny-vit",
                 "--run-dir", str(tmp_path / "run")]) == 2  # fmt: skip
    assert "fgvc-aircraft-2013b" in capsys.readouterr().err
    assert main(["train", "--benchmark", "synthetic", "--set", "train.iterations=lots"]) == 2
    assert "wrong type" in capsys.readouterr().err
    assert main(["train", "--benchmark", "synthetic", "--model", "ViT-Nonexistent"]) == 2
    assert "not an open_clip architecture" in capsys.readouterr().err
    assert (
        main(["train", "--benchmark", "synthetic", "--model", "rank1-tiny-vit", "--pretrained", str(tmp_path / "x.pt")])
        == 2
    )
    assert "no such checkpoint" in capsys.readouterr().err


def test_demo_refuses_bad_arguments_before_pretraining(tmp_path, capsys):
    for arguments, message in ((["--iterations", "0"], "train.iterations=0"), (["--pretrain-steps", "0"], "pretrain_steps=0"),
                               (["--methods", "pool,pool"], "at most once")):  # fmt: skip
        assert main(["demo", "--run-dir", str(tmp_path / "demo"), "--no-progress", *arguments]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists(), "refused before anything was pre-trained or written"


def test_demo_command_runs(tmp_path, capsys):
    code = main(["demo", "--run-dir", str(tmp_path), "--iterations", "2", "--pretrain-steps", "3", "--test-per-class",
                 "1", "--domains", "shapes,digits", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "rank-1 expert pool + AGO" in out and "sequential full fine-tuning" in out and "Transfer" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["method"] for row in summary["methods"]] == ["pool", "lora", "full"]
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "pool" / "accuracy_mtil.png").exists()
