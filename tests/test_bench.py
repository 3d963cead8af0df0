"""The bench/ harness: its baselines compute what they claim, its timers measure, its CLI writes every output;
and a pytest-benchmark suite on small CPU shapes so that regressions show in CI output."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is run from the repository root and is not an installed package
    sys.path.insert(0, ROOT)

from bench.__main__ import main  # noqa: E402
from bench.ago_bench import AgoSweep, ago_grouped_mean, make_ago_inputs  # noqa: E402
from bench.baselines import DenseLoRALinear, OfficialPoolLinear, ago_loss_loop, make_peft_lora  # noqa: E402
from bench.layer import LayerBenchmark, LayerShape, LayerSweep, ideal_cost  # noqa: E402
from bench import timing  # noqa: E402
from bench.timing import TimingConfig, summarize, time_cpu  # noqa: E402
from rank1_kernels import FusedRank1PoolLinear, backends  # noqa: E402
from _tolerance import assert_close_by_rule  # noqa: E402


def _pool_pair(r: int, k: int, routing: str, seed: int = 0):
    """The same pool layer in fp32 (under test) and fp64 (the oracle), with random non-zero B."""
    torch.manual_seed(seed)
    layer64 = FusedRank1PoolLinear(24, 40, r=r, k=k, routing=routing, dtype=torch.float64)
    with torch.no_grad():
        layer64.lora_B.normal_(0.0, 0.5)
    layer32 = FusedRank1PoolLinear(24, 40, r=r, k=k, routing=routing, dtype=torch.float32)
    layer32.load_state_dict(
        {name: t.float() if t.is_floating_point() else t for name, t in layer64.state_dict().items()}
    )
    return layer32, layer64


def _forward_and_grads(module, x):
    """Output and gradients (x, lora_A, lora_B) of sum(y * g) for a fixed random g."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad((y * g).sum(), [x, module.lora_A, module.lora_B] if hasattr(module, "lora_A") else [x])
    return y, grads


def test_every_method_applies_the_layers_dropout_to_the_lora_input():
    """A sweep with dropout gives each baseline the pool's dropout on the LoRA input (the fused kernels then read
    the dropped-out x as a second input); with dropout 0 none has a Dropout module."""
    layer = FusedRank1PoolLinear(16, 24, r=4, k=2, dropout=0.2)
    modules = {"dense": DenseLoRALinear.from_pool(layer), "official": OfficialPoolLinear(layer)}
    assert all(module.dropout.p == 0.2 for module in modules.values())
    assert make_peft_lora(layer).lora_dropout["default"].p == 0.2
    plain = FusedRank1PoolLinear(16, 24, r=4, k=2)
    assert isinstance(DenseLoRALinear.from_pool(plain).dropout, torch.nn.Identity)
    assert isinstance(OfficialPoolLinear(plain).dropout, torch.nn.Identity)
    sweep = LayerSweep("drop", [LayerShape("tiny", "proj", 2, 5, 16, 24)], [4], [2], ["fp32"],
                       directions=["forward"], dropout=0.2)  # fmt: skip
    rows = list(LayerBenchmark(torch.device("cpu"), TimingConfig(1, 2, 2, 0.0), None, log=lambda message: None).run(sweep))
    assert rows and all(row["dropout"] == 0.2 for row in rows)
    # nn.Linear is timed again after the group: its drift is on every row of the group, and flagged when large.
    assert all(isinstance(row["floor_drift"], float) for row in rows if row["status"] == "ok")
    from bench import report

    for row in rows:
        row["floor_drift"] = 0.05
    assert "DRIFT: nn.Linear timed again after the group changed by +5.0% (forward)" in "\n".join(report.layer_tables(rows))
    with pytest.raises(ValueError, match=r"dropout 1.0: expected a probability in \[0, 1\)"):
        LayerSweep("drop", [], [4], [2], ["fp32"], dropout=1.0)


def test_rank_major_sweeps_reach_every_shape_at_the_smallest_r_first():
    shapes = [LayerShape("tiny", name, 2, 5, 16, 24) for name in ("a", "b")]
    asked = []

    class RecordingBudget(timing.TimeBudget):
        def allows(self, what):
            asked.append(what.split()[3] + " " + what.split()[-1])
            return False

    for rank_major, expected in ((True, ["a r=4", "b r=4", "a r=8", "b r=8"]),
                                 (False, ["a r=4", "a r=8", "b r=4", "b r=8"])):  # fmt: skip
        asked.clear()
        sweep = LayerSweep("order", shapes, [4, 8], [2], ["fp32"], rank_major=rank_major)
        assert list(LayerBenchmark(torch.device("cpu"), TimingConfig(), None, budget=RecordingBudget()).run(sweep)) == []
        assert asked == expected


def test_official_way_equals_batch_routed_pool():
    layer32, layer64 = _pool_pair(r=12, k=5, routing="batch")
    x64 = torch.randn(3, 7, 24, dtype=torch.float64)
    oracle, oracle_grads = _forward_and_grads(layer64.train(), x64)
    ours, ours_grads = _forward_and_grads(layer32.train(), x64.float())
    official, official_grads = _forward_and_grads(OfficialPoolLinear(layer32).train(), x64.float())
    assert_close_by_rule(official, ours, oracle, "official way, output")
    for name, got, same_dtype, want in zip(("dx", "dA", "dB"), official_grads, ours_grads, oracle_grads):
        assert_close_by_rule(got, same_dtype, want, f"official way, {name}")
    # Only the batch-shared set S gets a gradient in A: the baseline really selects, it is not dense LoRA.
    assert int((official_grads[1].abs().sum(dim=1) > 0).sum()) == 5


@pytest.mark.parametrize("baseline", ["dense", "peft"])
def test_dense_baselines_equal_pool_with_all_experts(baseline):
    layer32, layer64 = _pool_pair(r=6, k=6, routing="sample")
    x64 = torch.randn(2, 5, 24, dtype=torch.float64)
    oracle, _ = _forward_and_grads(layer64.train(), x64)
    ours, _ = _forward_and_grads(layer32.train(), x64.float())
    module = DenseLoRALinear.from_pool(layer32) if baseline == "dense" else make_peft_lora(layer32)
    assert not any(p.requires_grad for n, p in module.named_parameters() if "lora" not in n), "base must be frozen"
    with torch.no_grad():
        got = module(x64.float())
    assert_close_by_rule(got, ours, oracle, f"{baseline} LoRA baseline")


def test_ago_loop_equals_grouped_mean():
    sweep = AgoSweep(widths=[16, 8], blocks=2, r=6, top_m=3, previous_tasks=[2])
    inputs32 = make_ago_inputs(sweep, 2, torch.float32, torch.device("cpu"))
    B_curs, B_prevs, cur_masks, prev_masks, tops = inputs32
    oracle = ago_grouped_mean(
        [b.double() for b in B_curs], [b.double() for b in B_prevs], cur_masks, prev_masks, "reference"
    )
    ours = ago_grouped_mean(B_curs, B_prevs, cur_masks, prev_masks, "reference")
    assert_close_by_rule(ago_loss_loop(B_curs, B_prevs, tops), ours, oracle, "AGO per-layer loop")
    assert len(B_curs) == 2 * 2 * 6 and float(oracle.detach()) > 0


def test_ago_bench_rotates_copies_of_the_inputs():
    from bench.ago_bench import _steps, copies_of_inputs, run_ago

    sweep = AgoSweep(widths=[8], blocks=1, r=4, top_m=2, previous_tasks=[2], directions=["forward+backward"])
    B_curs, B_prevs, *_ = make_ago_inputs(sweep, 2, torch.float32, torch.device("cpu"))
    sets = copies_of_inputs(B_curs, B_prevs, 3)
    addresses = {B.data_ptr() for curs, prevs in sets for B in (*curs, *prevs)}
    assert len(addresses) == 3 * (len(B_curs) + len(B_prevs)), "every set in memory of its own"
    assert all(torch.equal(a, b) for curs, prevs in sets for a, b in zip((*curs, *prevs), (*B_curs, *B_prevs)))
    assert all(B.requires_grad for curs, _ in sets for B in curs)
    read = []

    def loss_fn(curs, prevs):
        read.append(curs[0].data_ptr())
        return sum((cur * cur).sum() for cur in curs) + sum(prev.sum() for prev in prevs)

    steps, prepare = _steps(loss_fn, sets)
    for i in range(3):
        grads = steps["forward+backward"](i)
        assert torch.equal(grads[0], 2 * sets[i][0][0].detach())
    prepare()
    assert steps["backward"](1)[0].shape == B_curs[0].shape
    assert read == [curs[0].data_ptr() for curs, _ in sets] * 2, "step i computes on set i; prepare retains each"
    timing = TimingConfig(warmup=1, min_samples=2, max_samples=2, target_seconds=0.0)
    rows = list(run_ago(sweep, torch.device("cpu"), timing, log=lambda message: None))
    assert rows and all(row["n_buffers"] == 2 and row["set_mib"] >= 0 for row in rows)  # CPU: two sets


def test_ideal_cost_counts_gemm_work():
    shape = LayerShape("m", "l", n_samples=1, tokens_per_sample=2, in_features=3, out_features=4)  # M=2, K=3, N=4
    assert ideal_cost(shape, 1, "forward", 4, base_only=False) == (
        2 * 2 * 4 * 3 + 2 * 2 * 3 + 2 * 2 * 4,
        (6 + 12 + 8 + 7) * 4,
    )
    assert ideal_cost(shape, 1, "forward", 4, base_only=True)[0] == 2 * 2 * 4 * 3
    assert ideal_cost(shape, 1, "backward", 2, base_only=False)[0] == 2 * 2 * 4 * 3 + 4 * 2 * 4 + 4 * 2 * 3


def test_summary_statistics():
    summary = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (summary.median_ms, summary.min_ms, summary.samples) == (3.0, 1.0, 5)
    assert summary.p20_ms == pytest.approx(1.8) and summary.p80_ms == pytest.approx(4.2)


def test_cpu_timer_measures_the_step():
    calls = []

    def step(buffer_index):
        calls.append(buffer_index)
        time.sleep(0.002)

    result = time_cpu(
        step, n_buffers=3, config=TimingConfig(warmup=2, min_samples=4, max_samples=6, target_seconds=0.0)
    )
    assert 2.0 <= result.median_ms < 500.0
    assert result.samples == 4 and len(calls) == 6
    assert set(calls) == {0, 1, 2}, "buffers must rotate"


def test_event_timer_rotates_buffers_within_a_batch(monkeypatch):
    """The CUDA-event loop, run with stand-in events (no GPU here): every iteration gets the next buffer."""

    class CountingEvent:
        clock = 0.0

        def __init__(self, enable_timing: bool):
            self.time = None

        def record(self):
            CountingEvent.clock += 1.0
            self.time = CountingEvent.clock

        def elapsed_time(self, end):
            return end.time - self.time

    monkeypatch.setattr(torch.cuda, "Event", CountingEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    calls = []
    times = timing._time_with_events(
        calls.append, 3, TimingConfig(warmup=0, min_samples=7, max_samples=7, target_seconds=0.0)
    )
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    assert times == [1.0] * 7


def test_graph_timer_captures_one_graph_per_buffer_and_replays_in_turn(monkeypatch):
    """The CUDA-graph loop's control flow, with stand-ins for streams, graphs and events (no GPU here)."""
    import contextlib

    captured, replayed = [], []

    class RecordingGraph:
        def replay(self):
            replayed.append(self.buffer)

    capturing = {}

    @contextlib.contextmanager
    def graph_context(graph):
        capturing["graph"] = graph
        yield
        capturing.pop("graph")

    def step(buffer_index):
        if "graph" in capturing:
            capturing["graph"].buffer = buffer_index
            captured.append(buffer_index)

    class CountingEvent:
        def __init__(self, enable_timing: bool):
            pass

        def record(self):
            pass

        def elapsed_time(self, end):
            return 1.0

    class FakeStream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordingGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph_context)
    monkeypatch.setattr(torch.cuda, "Event", CountingEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    result = timing.time_cuda_graph(step, 3, TimingConfig(warmup=1, min_samples=5, max_samples=5, target_seconds=0.0))
    assert captured == [0, 1, 2]
    assert replayed == [0, 1, 2] + [0] + [0, 1, 2, 0, 1], (
        "one untimed replay of each graph, the warm-up (1 iteration), then the timed ones in turn")
    assert result.samples == 5 and result.peak_memory_mib is None and result.median_ms == 1.0

    # Several iterations per graph: each graph runs consecutive buffers, and a replay's time is shared among them.
    captured.clear()
    config = TimingConfig(warmup=1, min_samples=5, max_samples=5, target_seconds=0.0, graph_iterations=2)
    result = timing.time_cuda_graph(step, 3, config)
    assert captured == [0, 1] + [2, 0] + [1, 2], "graphs replayed in turn rotate through every buffer"
    assert result.median_ms == 0.5
    # When the iterations per graph share a factor with the buffers, fewer graphs close the rotation.
    captured.clear()
    replayed.clear()
    timing.time_cuda_graph(step, 4, config)
    assert captured == [0, 1] + [2, 3], "two graphs hold the whole rotation of four buffers"
    assert set(replayed) == {1, 3}, "only those two graphs are replayed (a graph records its last buffer)"


class _RefusingBackend(backends.Backend):
    name = "bench_test_refuses"

    def refuse_reason(self, op, tensors):
        return "this test backend refuses everything (install nothing, it is a test)"


class _DelegatingBackend(backends.ReferenceBackend):
    name = "bench_test_accepts"


def test_every_backend_is_timed_or_its_refusal_reported(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_INSTANCES", dict(backends._INSTANCES))
    backends.register_backend(_RefusingBackend.name, 1000, _RefusingBackend)
    backends.register_backend(_DelegatingBackend.name, 1001, _DelegatingBackend)
    sweep = LayerSweep("main", [LayerShape("t", "p", 2, 3, 8, 8)], [4], [2], ["fp32"], directions=["forward"])
    rows = list(LayerBenchmark(torch.device("cpu"), TimingConfig(1, 2, 2, 0.0), None, log=lambda m: None).run(sweep))
    by_method = {row["method"]: row for row in rows}
    assert by_method["pool[bench_test_refuses]"]["status"] == "refused"
    assert "refuses everything" in by_method["pool[bench_test_refuses]"]["reason"]
    assert by_method["pool[bench_test_accepts]"]["status"] == "ok"
    assert by_method["nn.Linear"]["ratio_to_linear"] == 1.0
    for method in ("dense LoRA", "peft LoRA", "official (dense dW)", "pool[reference]"):
        assert by_method[method]["status"] == "ok" and by_method[method]["median_ms"] > 0


def test_cli_writes_table_csv_json_plots_and_readme(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["sweep", "--preset", "tiny", "--out", str(out), "--quiet", "--only", "ago,step"]) == 0
    first_table = capsys.readouterr().out
    assert "[ago]" in first_table and "[step]" in first_table and "[main]" not in first_table
    assert main(["sweep", "--preset", "tiny", "--out", str(out), "--quiet", "--only", "main,tokens", "--append",
                 "--note", "test run"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "[main]" in table and "1.00x" in table and "[ago]" in table, "the table shows the whole folder"
    # Each r group is timed beside its own nn.Linear: every floor is shown, not only the last group's.
    assert "nn.Linear (r=4 group)" in table and "nn.Linear (r=8 group)" in table

    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["section"] for row in rows} == {"layer", "ago", "step"}, "--append must keep the earlier parts"
    assert all(row["device"].startswith("CPU") and row["torch"] == torch.__version__ and row["commit"] for row in rows)
    methods = {row["method"] for row in rows if row["section"] == "layer"}
    assert {"nn.Linear", "dense LoRA", "peft LoRA", "official (dense dW)", "pool[reference]"} <= methods
    ok_layer_rows = [row for row in rows if row["section"] == "layer" and row["status"] == "ok"]
    assert ok_layer_rows and all(float(row["median_ms"]) > 0 and row["ratio_to_linear"] for row in ok_layer_rows)
    steps = {row["method"]: row for row in rows if row["section"] == "step"}
    assert float(steps["pool[reference]"]["steps_per_s"]) > 0 and steps["pool[reference]"]["n_pool_layers"] == "12"

    with open(out / "results.json") as handle:
        document = json.load(handle)
    environment = document["environment"]
    for key in ("device", "torch", "triton", "commit", "tree_dirty", "date_utc"):
        assert key in environment
    assert environment["device"].startswith("CPU")
    assert document["conditions"]["preset"] == "tiny" and document["conditions"]["timing"]["warmup"] == 1
    assert document["conditions"]["earlier_runs"][0]["parts"] == ["ago", "step"]

    plots = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert any(name.startswith("time_vs_tokens") for name in plots) and any(
        name.startswith("time_vs_r") for name in plots
    )
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    summary = next(line for line in readme.splitlines() if line.startswith("| pool[reference] (batch) | perf_counter"))
    assert summary.count("x |") == 2, f"geomean ratios to nn.Linear and to the official way expected: {summary}"
    for expected in ("CPU", "test run", "ratio to nn.Linear", "Whole training step", "AGO loss", "Summary"):
        assert expected in readme

    for name in plots:
        os.remove(out / name)
    assert main(["report", "--out", str(out), "--note", "rebuilt from results.json"]) == 0
    assert sorted(name for name in os.listdir(out) if name.endswith(".png")) == plots
    assert "rebuilt from results.json" in (out / "README.md").read_text()
    with open(out / "results.json") as handle:
        assert json.load(handle)["results"] == document["results"], "report must not change the measurements"


def test_cli_keeps_other_parts_when_one_fails(tmp_path, monkeypatch, capsys):
    import bench.__main__ as cli

    def broken_step(*args, **kwargs):
        raise ImportError("open_clip is not installed")

    monkeypatch.setattr(cli, "run_step", broken_step)
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "ago,step"]) == 1
    assert "part 'step' failed" in capsys.readouterr().err
    with open(tmp_path / "results.json") as handle:
        document = json.load(handle)
    assert {row["section"] for row in document["results"]} == {"ago"}
    assert document["conditions"]["failed_parts"] == {"step": "ImportError: open_clip is not installed"}
    assert "open_clip is not installed" in (tmp_path / "README.md").read_text()


@pytest.mark.slow
def test_cli_times_a_fast_backend_forced_on_cpu(tmp_path):
    """A fast backend plugs into the harness: Triton through its CPU interpreter (enabled before import, hence a
    fresh process), timed only with --time-forced-only."""
    import subprocess

    from rank1_kernels import known_backends

    if "triton" not in known_backends():
        pytest.skip("no triton backend is declared in rank1_kernels.backends")
    command = [sys.executable, "-m", "bench", "sweep", "--preset", "tiny", "--only", "tokens", "--quiet",
               "--time-forced-only", "--triton-variants", "--out", str(tmp_path)]  # fmt: skip
    environment = dict(os.environ, TRITON_INTERPRET="1")
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    pinned = ("triton-gather", "triton-mask", "triton-shrink-fused", "triton-shrink-separate", "triton-torch-routing")
    for method in ("pool[triton]", *(f"pool[{name}]" for name in pinned)):
        timed = [row for row in rows if row["method"] == method]
        assert timed and all(row["status"] == "ok" and float(row["median_ms"]) > 0 for row in timed), [
            (row["status"], row["reason"]) for row in timed
        ]


def test_pinned_fused_shrink_refuses_a_pool_too_wide_for_it():
    """Timed as "fused", a pool whose slots do not fit the fused shrink would silently run the separate one."""
    pytest.importorskip("triton")
    from bench.variants import register_triton_variants
    from rank1_kernels import resolve_backend

    names, unavailable = register_triton_variants()
    assert unavailable is None and "triton-shrink-fused" in names
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def tensors(r, k):
        x, weight, A, B = (torch.randn(*shape, device=device) for shape in ((2 * 20, 8), (6, 8), (r, 8), (6, r)))
        return [x, weight, A, B, torch.zeros(2, k, dtype=torch.int64, device=device), torch.ones(2, k, device=device)]

    assert resolve_backend("triton-shrink-fused", "pool_linear", tensors(12, 8)).name == "triton-shrink-fused"
    with pytest.raises(RuntimeError, match="mask variant has 40 slots per row; the fused shrink holds at most 32"):
        resolve_backend("triton-shrink-fused", "pool_linear", tensors(40, 30))
    assert resolve_backend("triton-shrink-separate", "pool_linear", tensors(40, 30)).name == "triton-shrink-separate"
    # Every pinned row routes with the routing kernel, as pool[triton] does: the rows differ in the pin alone. The
    # torch-routing row differs from pool[triton] in its routing alone.
    router_inputs = [torch.randn(2, 8, device=device), torch.randn(12, 8, device=device)]
    for name in names:
        expected = "reference" if name == "triton-torch-routing" else name
        assert resolve_backend(name, "route", router_inputs).name == expected
    assert resolve_backend("triton-torch-routing", "pool_linear", tensors(12, 8)).name == "triton-torch-routing"


def test_cli_time_budget_skips_groups_but_still_writes_results(tmp_path):
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--budget-minutes", "0"]) == 0
    with open(tmp_path / "results.json") as handle:
        document = json.load(handle)
    assert document["results"] == []
    assert any(what.startswith("layer [main] tiny proj ") and " fp32 r=" in what
               for what in document["conditions"]["skipped_for_time"])  # fmt: skip
    assert "step ViT-B-16 fp32" in document["conditions"]["skipped_for_time"]
    assert "time budget" in (tmp_path / "README.md").read_text()


def _tokens_groups(tmp_path):
    with open(tmp_path / "results.json") as handle:
        document = json.load(handle)
    return document, sorted({row["group_key"] for row in document["results"] if row["group"] == "tokens"})


def _record_measured_groups(monkeypatch) -> list:
    """The rows count of every layer group the sweep measures from now on, in order."""
    import bench.layer as layer_module

    measured = []
    run_group = layer_module.LayerBenchmark._run_group

    def recording(self, sweep, shape, dtype_name, r):
        measured.append(shape.rows)
        yield from run_group(self, sweep, shape, dtype_name, r)

    monkeypatch.setattr(layer_module.LayerBenchmark, "_run_group", recording)
    return measured


def test_cli_writes_each_finished_group_at_once_and_keeps_them_when_a_part_fails(tmp_path, monkeypatch, capsys):
    """A part killed at its timeout, or failing in its second group (a sticky CUDA error), keeps its first group:
    results.json holds it, and the part is marked incomplete, before the second group starts."""
    import bench.layer as layer_module

    measured, seen_on_disk = [], []
    run_group = layer_module.LayerBenchmark._run_group

    def second_group_fails(self, sweep, shape, dtype_name, r):
        measured.append(shape.rows)
        if len(measured) == 2:
            document, groups = _tokens_groups(tmp_path)
            seen_on_disk.append((groups, document["conditions"]["incomplete_parts"]))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield from run_group(self, sweep, shape, dtype_name, r)

    monkeypatch.setattr(layer_module.LayerBenchmark, "_run_group", second_group_fails)
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "tokens"]) == 1
    assert "part 'tokens' failed (its finished groups are kept)" in capsys.readouterr().err
    ((groups_before, incomplete),) = seen_on_disk
    assert len(groups_before) == 1 and incomplete == ["tokens"]
    document, groups = _tokens_groups(tmp_path)
    assert groups == groups_before and "illegal memory access" in document["conditions"]["failed_parts"]["tokens"]
    assert "incomplete_parts" not in document["conditions"]


def test_cli_resume_measures_only_the_missing_groups(tmp_path, monkeypatch):
    """--resume keeps the groups a results folder holds and measures the others, so a sweep split over several
    time-limited calls moves forward."""
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "tokens"]) == 0
    document, all_groups = _tokens_groups(tmp_path)
    assert len(all_groups) == 2
    document["results"] = [row for row in document["results"] if row.get("group_key") != all_groups[1]]
    with open(tmp_path / "results.json", "w") as handle:
        json.dump(document, handle)
    measured = _record_measured_groups(monkeypatch)
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "tokens", "--resume"]) == 0
    assert len(measured) == 1
    resumed, groups = _tokens_groups(tmp_path)
    assert groups == all_groups and resumed["conditions"]["kept_from_earlier_runs"] == [all_groups[0]]
    assert len(resumed["results"]) == len(document["results"]) * 2


def test_cli_resume_measures_again_what_another_commit_measured_and_reports_mixed_sources(tmp_path, monkeypatch):
    """Rows of another commit (or device, torch, triton) are not this code's numbers: --resume measures their groups
    again, and until then keeps them, with every report saying which rows came from where."""
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "tokens,main"]) == 0
    document, all_groups = _tokens_groups(tmp_path)
    for row in document["results"]:
        if row["group"] == "tokens" and row["group_key"] == all_groups[1]:
            row["commit"] = "0ld0ld0"
    with open(tmp_path / "results.json", "w") as handle:
        json.dump(document, handle)
    assert main(["report", "--out", str(tmp_path)]) == 0
    table, readme = (tmp_path / "table.txt").read_text(), (tmp_path / "README.md").read_text()
    assert "MIXED: the rows come from 2 runs" in table and "commit 0ld0ld0" in table
    assert "MIXED: the rows come from 2 runs" in readme and "commit 0ld0ld0" in readme

    measured = _record_measured_groups(monkeypatch)
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "tokens", "--resume"]) == 0
    resumed, groups = _tokens_groups(tmp_path)
    assert len(measured) == 1 and groups == all_groups
    assert not any(row["commit"] == "0ld0ld0" for row in resumed["results"])
    assert len(resumed["results"]) == len(document["results"])
    assert "MIXED" not in (tmp_path / "table.txt").read_text()

    # Edited code under the same commit, or other settings (--time-forced-only), is another source too.
    for field, value in (("code_digest", "3d173d"), ("bench_settings", "time_forced_only=True; backends=reference")):
        for row in resumed["results"]:
            if row["group"] == "tokens" and row["group_key"] == all_groups[1]:
                row[field] = value
        with open(tmp_path / "results.json", "w") as handle:
            json.dump(resumed, handle)
        measured.clear()
        assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "tokens", "--resume"]) == 0
        resumed, _ = _tokens_groups(tmp_path)
        assert len(measured) == 1 and not any(row[field] == value for row in resumed["results"]), field

    # Rows of a group the preset no longer has (an older grouping) go once their part has run to its end.
    for row in resumed["results"]:
        if row["group"] == "tokens" and row["group_key"] == all_groups[0]:
            row["group_key"], row["commit"] = "layer [tokens] an older grouping", "0ld0ld0"
    with open(tmp_path / "results.json", "w") as handle:
        json.dump(resumed, handle)
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "tokens", "--resume"]) == 0
    final, groups = _tokens_groups(tmp_path)
    assert groups == all_groups and len(final["results"]) == len(document["results"])


def _grid_rows(group: str, pool_ms: float, linear_ms: float = 1.0, peft_ms: float = 2.0, official_ms: float = 3.0,
               spread: float = 0.0, shapes=("attn.q", "attn.qkv", "mlp.c_fc", "mlp.c_proj"),
               timer: str = "cuda-graph") -> list[dict]:  # fmt: skip
    """Layer rows of the target grid (ViT-B/16 shapes, bf16, r x k, batch routing) with the given median times."""
    from bench.presets import vit_b16

    dims = {shape.layer: (shape.in_features, shape.out_features) for shape in vit_b16()}
    rows = []
    for layer in shapes:
        base = dict(section="layer", group=group, model="vit-b16", layer=layer, rows=32 * 197, in_features=dims[layer][0],
                    out_features=dims[layer][1], dtype="bf16", timer=timer, status="ok", dropout=0.0)  # fmt: skip
        for r in (12, 64, 256):
            for direction in ("forward", "forward+backward"):
                methods = [("nn.Linear", None, None, linear_ms), ("peft LoRA", r, None, peft_ms)]
                methods += [(m, r, k, ms) for k in (4, 8) for m, ms in
                            (("official (dense dW)", official_ms), ("pool[triton]", pool_ms))]  # fmt: skip
                for method, rank, k, ms in methods:
                    rows.append(dict(base, group_r=r, r=rank, k=k, method=method, direction=direction,
                                     routing="batch" if k else None, median_ms=ms, p20_ms=ms * (1 - spread),
                                     p80_ms=ms * (1 + spread)))  # fmt: skip
    return rows


def test_targets_are_judged_case_by_case_from_the_grid_rows():
    from bench import report

    lines = {(line[0], line[1], line[2]): line for line in report.targets_table(_grid_rows("targets", 1.05))}
    forward = lines[("forward <= 1.10x nn.Linear", "pool[triton]", "cuda-graph")]
    assert forward[3:6] == ["24/24", "24", "0"] and forward[-1] == "PASS"
    assert lines[("forward+backward <= 1.20x frozen nn.Linear", "pool[triton]", "cuda-graph")][-1] == "PASS"
    assert lines[(">= 1.5x faster than peft LoRA, same r (fwd+bwd)", "pool[triton]", "cuda-graph")][-1] == "PASS"
    official = lines[(">= 2x faster than official, same r, k (fwd+bwd)", "pool[triton]", "cuda-graph")]
    assert official[-1] == "PASS" and official[6].startswith("2.86x")
    assert lines[("forward <= 1.10x nn.Linear", "pool[cuda]", "cuda-graph")][-1] == "not measured"

    # One slow case fails its target, and is named as the worst; a spread across the bound is counted.
    rows = _grid_rows("targets", 1.05, spread=0.1)
    slow = next(row for row in rows if row["method"] == "pool[triton]" and row["layer"] == "mlp.c_fc"
                and row["group_r"] == 256 and row["k"] == 8 and row["direction"] == "forward")  # fmt: skip
    slow.update(median_ms=1.3, p20_ms=1.3, p80_ms=1.3)
    forward = {line[0]: line for line in report.targets_table(rows) if line[1] == "pool[triton]"}[
        "forward <= 1.10x nn.Linear"]
    assert forward[3:5] == ["24/24", "23"] and forward[-1] == "FAIL" and forward[7] == "0.0%"
    assert forward[5] == "23", "every case with a 10% spread around 1.05x crosses 1.10x"
    assert forward[6].startswith("1.30x") and "mlp.c_fc r=256 k=8" in forward[6]

    # Rows of the dedicated part win over the same cells of the vit-b16 part; a missing case is not a pass.
    rows = _grid_rows("vit-b16", 2.0) + _grid_rows("targets", 1.0, shapes=("attn.q",))
    forward = {line[0]: line for line in report.targets_table(rows) if line[1] == "pool[triton]"}[
        "forward <= 1.10x nn.Linear"]
    assert forward[3] == "24/24" and forward[-1] == "FAIL" and forward[6].startswith("2.00x") and " attn.qkv r=12" in forward[6]
    # A case is judged from one group's rows only (timed side by side), never a pool row of one and a floor of another.
    rows = _grid_rows("vit-b16", 2.0) + [row for row in _grid_rows("targets", 1.0) if row["method"] != "nn.Linear"]
    forward = {line[0]: line for line in report.targets_table(rows) if line[1] == "pool[triton]"}[
        "forward <= 1.10x nn.Linear"]
    assert forward[-1] == "FAIL" and forward[4] == "0"
    partial = _grid_rows("targets", 1.0)[:-1]  # the last case lost its forward+backward row
    line = {item[0]: item for item in report.targets_table(partial) if item[1] == "pool[triton]"}[
        "forward+backward <= 1.20x frozen nn.Linear"]
    assert line[3] == "23/24" and line[-1] == "pass so far (1 not measured)"
    # A shape with no rows at all (a part cut by its time budget) is not measured, not passed.
    line = {item[0]: item for item in report.targets_table(_grid_rows("targets", 1.0, shapes=("attn.q",)))
            if item[1] == "pool[triton]"}["forward <= 1.10x nn.Linear"]  # fmt: skip
    assert line[3] == "6/24" and line[-1] == "pass so far (18 not measured)"
    assert report.targets_table(_grid_rows("targets", 1.0, timer="events")[:0]) == []


def test_ago_target_and_the_targets_section_of_the_reports():
    from bench import report

    ago = [dict(section="ago", group="ago", method=method, dtype="bf16", n_layers=144, previous_tasks=10,
                direction="forward+backward", timer="cuda-graph", status="ok", median_ms=ms, p20_ms=ms, p80_ms=ms,
                n_buffers=9, set_mib=13.2)
           for method, ms in (("grouped[triton]", 0.04), ("grouped[cuda]", 0.06), ("per-layer loop", 0.01))]  # fmt: skip
    assert [[line[0], line[4], line[6]] for line in report.ago_target_table(ago)] == [
        ["grouped[triton]", "9 sets x 13.2 MiB", "PASS"], ["grouped[cuda]", "9 sets x 13.2 MiB", "FAIL"]]
    # Rows of a bench before the rotation timed one set, kept in L2: said so next to the verdict.
    old_row = {key: value for key, value in ago[0].items() if key not in ("n_buffers", "set_mib")}
    assert report.ago_target_table([old_row])[0][4] == "1 set (L2-warm: a lower bound)"
    rows = _grid_rows("targets", 1.05)
    environment = {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "commit": "abc", "date_utc": "now",
                   "device_type": "cuda", "cpu": "x", "cuda_runtime": "13.0", "python": "3.12"}  # fmt: skip
    text = report.text_report(rows, environment)
    assert "[targets]" in text and "forward <= 1.10x nn.Linear" in text
    readme = report.markdown_readme(rows, environment, {"preset": "gpu", "command": "x"}, [], "")
    assert "## Issue #3's speed targets" in readme and "| forward <= 1.10x nn.Linear | pool[triton] |" in readme


def test_report_rebuilds_when_the_floor_failed(tmp_path):
    """When nn.Linear's row of a shape failed, the other rows have no ratio; the README still renders them."""
    assert main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "--quiet", "--only", "main"]) == 0
    with open(tmp_path / "results.json") as handle:
        document = json.load(handle)
    for row in document["results"]:
        if row["method"] == "nn.Linear":
            row.update(status="error", reason="RuntimeError: planted")
        row["ratio_to_linear"] = None
    with open(tmp_path / "results.json", "w") as handle:
        json.dump(document, handle)
    assert main(["report", "--out", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert any(line.startswith("| nn.Linear ") and "error" in line for line in readme.splitlines())


def test_gpu_preset_covers_the_issue_grid():
    from bench.presets import get_preset

    preset = get_preset("gpu")
    sweeps = {sweep.group: sweep for sweep in preset.layer_sweeps}
    widths = {
        (shape.model, shape.in_features, shape.out_features) for sweep in sweeps.values() for shape in sweep.shapes
    }
    assert {("vit-b16", 768, 768), ("vit-b16", 768, 2304), ("vit-b16", 768, 3072)} <= widths
    assert {model for model, _, _ in widths} == {"vit-b16", "vit-l14", "llm-4096"}
    assert all(shape.rows == 32 * 197 for shape in sweeps["vit-b16"].shapes)
    for group in ("vit-b16", "vit-l14", "llm-4096"):
        sweep = sweeps[group]
        assert (sweep.ranks, sweep.top_ks, sweep.cuda_graphs) == ([12, 64, 256], [4, 8, 16], True)
        assert set(sweep.directions) == {"forward", "backward", "forward+backward"}
    assert {dtype for sweep in sweeps.values() for dtype in sweep.dtypes} == {"bf16", "fp16", "fp32"}
    assert len({shape.rows for shape in sweeps["tokens"].shapes}) >= 6
    # The targets part: the issue's grid on the shipped backends, every shape at r=12 before any at r=256.
    targets = sweeps["targets"]
    assert preset.parts()[0] == "targets" and targets.rank_major and targets.backends == ["triton", "cuda"]
    assert (targets.ranks, targets.top_ks, targets.dtypes, targets.routings) == ([12, 64, 256], [4, 8], ["bf16"], ["batch"])
    assert targets.shapes == sweeps["vit-b16"].shapes and targets.cuda_graphs
    from bench import report

    assert (report.TARGET_RANKS, report.TARGET_TOP_KS) == (tuple(targets.ranks), tuple(targets.top_ks))
    assert sweeps["dropout"].dropout == 0.2
    assert len(preset.ago.layer_widths()) == 144
    assert preset.ago.cuda_graphs  # the 50 us target: GPU time with and without the host's launch overhead
    assert (preset.step.model, preset.step.batch_size, preset.step.cuda_graphs) == ("ViT-B-16", 32, True)


def test_cli_refuses_the_gpu_preset_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal applies to machines without it")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["sweep", "--preset", "gpu", "--device", "cpu"])
    with pytest.raises(SystemExit, match="not a part of preset"):
        main(["sweep", "--preset", "tiny", "--only", "nonexistent"])


def test_environment_takes_the_commit_from_rank1_commit_without_git(monkeypatch):
    """A copy of the work tree without .git (a lent GPU machine, bench/gpu_session.sh) names its commit in
    RANK1_COMMIT and whether the copy was dirty in RANK1_TREE_DIRTY; a git checkout keeps git's answer."""
    from bench import environment as env_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(env_module, "_git", lambda *args: None)
    monkeypatch.delenv("RANK1_COMMIT", raising=False)
    monkeypatch.delenv("RANK1_TREE_DIRTY", raising=False)
    assert (env_module.environment(cpu)["commit"], env_module.environment(cpu)["tree_dirty"]) == (None, None)
    monkeypatch.setenv("RANK1_COMMIT", "0123abc")
    assert (env_module.environment(cpu)["commit"], env_module.environment(cpu)["tree_dirty"]) == ("0123abc", None)
    monkeypatch.setenv("RANK1_TREE_DIRTY", "1")
    assert env_module.environment(cpu)["tree_dirty"] is True
    monkeypatch.setenv("RANK1_TREE_DIRTY", "0")
    assert env_module.environment(cpu)["tree_dirty"] is False
    answers = {("rev-parse", "HEAD"): "f" * 40, ("status", "--porcelain"): ""}
    monkeypatch.setattr(env_module, "_git", lambda *args: answers[args])
    assert (env_module.environment(cpu)["commit"], env_module.environment(cpu)["tree_dirty"]) == ("f" * 40, False)


@pytest.mark.slow
def test_gpu_session_script_dry_run(tmp_path):
    """bench/gpu_session.sh, the one-command GPU session, in its CPU dry mode: every step leaves its log, at most
    8 files land in the output folder (all that comes back from a device call), the results travel as one tarball,
    and a budget too small for anything skips the steps with a message and still writes the summary."""
    import shutil
    import subprocess
    import tarfile

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out, work = tmp_path / "out", tmp_path / "work"
    environment = dict(
        os.environ, PYTHON=sys.executable, RANK1_GPU_SESSION_DRY="1", RANK1_GPU_SESSION_WORK=str(work),
        RANK1_NVCC="none", RANK1_BENCH_PARTS="main", RANK1_PYTEST_WORKERS="0",
        RANK1_PYTEST_ARGS_A="tests/test_bench.py::test_summary_statistics",
    )  # fmt: skip
    command = ["bash", os.path.join("bench", "gpu_session.sh"), str(out), "300"]
    completed = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=400, check=False
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    files = {path.name for path in out.iterdir()}
    assert len(files) <= 8 and all(path.is_file() for path in out.iterdir())
    assert {"env.txt", "cuda_build.txt", "gpu_tests.txt", "gpu_tests.xml", "bench.txt", "bench_README.md",
            "bench_results.tar.gz", "summary.txt"} == files  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert "tests A (GPU tests without the CUDA extension): 1 passed, 0 failed" in summary
    assert "part main: complete" in summary and "summary" in completed.stdout
    assert "nvcc not found" in (out / "cuda_build.txt").read_text()
    with tarfile.open(out / "bench_results.tar.gz") as tar:
        names = {name.removeprefix("./") for name in tar.getnames()}
    assert {"results.json", "results.csv", "README.md", "table.txt"} <= names

    small = tmp_path / "small"
    environment["RANK1_GPU_SESSION_STEPS"] = "build,tests,bench"
    command = ["bash", os.path.join("bench", "gpu_session.sh"), str(small), "20"]
    completed = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "skipped: only" in (small / "gpu_tests.txt").read_text()
    assert "skipped, only" in (small / "bench.txt").read_text()
    assert "main | not run (no time left)" in (small / "summary.txt").read_text()


def test_gpu_session_counts_a_part_complete_only_for_this_code_and_settings(tmp_path):
    """The session script's check (DONE_PY) that lets a resumed session skip a part: only when every row of the
    part has this commit, this code and the settings this run stamps (which backends load). The rows come from a
    real sweep of the `ago` part (the CUDA extension is not built here: its rows are measured without it)."""
    # The assignment as bash reads it (a quote inside the program would end it early there).
    assignment = "eval \"$(sed -n '/^DONE_PY=/,/^VALID_PY=/p' bench/gpu_session.sh)\"; printf %s \"$DONE_PY\""
    done_py = subprocess.run(["bash", "-c", assignment], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    results = tmp_path / "results.json"
    subprocess.run([sys.executable, "-m", "bench", "sweep", "--preset", "tiny", "--only", "ago", "--out", str(tmp_path),
                    "--quiet"], cwd=ROOT, check=True, timeout=300)  # fmt: skip
    document = json.loads(results.read_text())
    real = document["results"][0]
    assert "cuda" not in real["bench_settings"], "a backend without its kernels times nothing: not in the settings"
    document["results"] += [dict(real, group="main", bench_settings="time_forced_only=True; backends=reference"),
                            dict(real, group="step", code_digest="other"), dict(real, group="tokens", commit="another")]  # fmt: skip
    document["conditions"]["parts"] += ["main", "step", "tokens"]
    results.write_text(json.dumps(document))

    def complete(load_cuda: str) -> list[str]:
        environment = dict(os.environ, RANK1_COMMIT=real["commit"] or "", RANK1_BENCH_LOAD_CUDA=load_cuda)
        completed = subprocess.run([sys.executable, "-c", done_py, str(results), "tiny"], cwd=ROOT, env=environment,
                                   capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
        return completed.stdout.split()

    assert complete("0") == ["ago"]
    assert complete("1") == [], "rows measured without pool[cuda] do not complete a part once the extension loads"


@pytest.mark.gpu
def test_layer_benchmark_on_cuda_with_events_graphs_memory_and_throughput():
    from bench.environment import nominal_peaks

    device = torch.device("cuda")
    sweep = LayerSweep("main", [LayerShape("t", "p", 4, 33, 64, 96)], [8], [4], ["bf16"], cuda_graphs=True)
    peaks = nominal_peaks(torch.cuda.get_device_name(device))
    rows = list(LayerBenchmark(device, TimingConfig(2, 5, 10, 0.0), peaks, log=lambda m: None).run(sweep))
    events = {(row["method"], row["direction"]): row for row in rows if row["timer"] == "events"}
    graphs = {(row["method"], row["direction"]): row for row in rows if row["timer"] == "cuda-graph"}
    for method in ("nn.Linear", "dense LoRA", "official (dense dW)", "pool[reference]"):
        for direction in ("forward", "backward", "forward+backward"):
            row = events[(method, direction)]
            assert row["status"] == "ok", row["reason"]
            assert row["median_ms"] > 0 and row["peak_memory_mib"] is not None and row["tflops"] > 0
            if peaks is not None:
                assert 0 < row["flops_fraction"] < 1 and 0 < row["bandwidth_fraction"] < 1
    for (method, direction), row in events.items():  # every backend that accepts the inputs must also run them
        assert row["status"] in ("ok", "refused"), f"{method} {direction}: {row['reason']}"
    for method in ("nn.Linear", "dense LoRA", "official (dense dW)"):  # capturable: no host reads
        assert graphs[(method, "forward+backward")]["status"] == "ok", graphs[(method, "forward+backward")]["reason"]
    assert graphs[("nn.Linear", "backward")]["status"] == "skipped"


# ---- pytest-benchmark suite: small CPU shapes, forward+backward, few rounds ---------------------------------

_SMALL = dict(n_samples=2, tokens=50, d_in=128, d_out=128, r=12, k=4)


def _small_modules():
    torch.manual_seed(0)
    layer = FusedRank1PoolLinear(_SMALL["d_in"], _SMALL["d_out"], r=_SMALL["r"], k=_SMALL["k"], routing="batch")
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
    return {
        "nn.Linear": layer.to_linear().requires_grad_(False),
        "dense LoRA": DenseLoRALinear.from_pool(layer),
        "official (dense dW)": OfficialPoolLinear(layer),
        "pool[reference]": layer,
    }


@pytest.mark.benchmark(group="layer forward+backward, 2x50 tokens, 128->128, r=12 k=4, fp32")
@pytest.mark.parametrize("method", ["nn.Linear", "dense LoRA", "official (dense dW)", "pool[reference]"])
def test_benchmark_layer_forward_backward(benchmark, method):
    module = _small_modules()[method].train()
    x = torch.randn(_SMALL["n_samples"], _SMALL["tokens"], _SMALL["d_in"], requires_grad=True)
    grad = torch.randn(_SMALL["n_samples"], _SMALL["tokens"], _SMALL["d_out"])
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]

    def step():
        return torch.autograd.grad(module(x), inputs, grad, allow_unused=True)

    grads = benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    assert grads[0].shape == x.shape and torch.isfinite(grads[0]).all()


@pytest.mark.benchmark(group="AGO loss forward+backward, 48 layers")
@pytest.mark.parametrize("method", ["per-layer loop", "grouped[reference]"])
def test_benchmark_ago(benchmark, method):
    sweep = AgoSweep(widths=[128, 64], blocks=4, r=12, top_m=4, previous_tasks=[5])
    B_curs, B_prevs, cur_masks, prev_masks, tops = make_ago_inputs(sweep, 5, torch.float32, torch.device("cpu"))
    if method == "per-layer loop":
        loss_fn = lambda: ago_loss_loop(B_curs, B_prevs, tops)  # noqa: E731
    else:
        loss_fn = lambda: ago_grouped_mean(B_curs, B_prevs, cur_masks, prev_masks, "reference")  # noqa: E731
    grads = benchmark.pedantic(lambda: torch.autograd.grad(loss_fn(), B_curs), rounds=20, warmup_rounds=3)
    assert len(grads) == 48 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("launch_path", [False, True], ids=["no-op kernels", "launch path"])
def test_host_overhead_script_times_every_row(tmp_path, launch_path):
    """bench/host_overhead.py, in its own process (it sets TRITON_INTERPRET): kernels swapped for no-ops, or run
    through Triton's launch path for a stand-in sm_90 device (compiled on first use)."""
    pytest.importorskip("triton")
    out = tmp_path / "host.json"
    command = [sys.executable, "-m", "bench.host_overhead", "--samples", "5", "--json", str(out)]
    result = subprocess.run(command + (["--launch-path"] if launch_path else []), cwd=ROOT, capture_output=True,
                            text=True, timeout=900, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["launch_path"] == launch_path and document["commit"] and document["torch"] == torch.__version__
    medians = document["median_us"]
    pools = ("pool r=12", "pool r=64", "pool r=12 softmax")
    rows = [f"{pool} {direction}" for pool in pools for direction in ("forward", "forward+backward")]
    rows += ["nn.Linear forward", "nn.Linear forward+backward", "AGO 144 layers forward+backward"]
    assert list(medians) == rows and all(value > 0 for value in medians.values())


@pytest.mark.gpu
def test_training_step_captured_whole_in_a_cuda_graph():
    """The step part's cuda-graph rows: forward, backward and a capturable AdamW replayed from graphs, for every
    variant whose layers read nothing back to the host."""
    import dataclasses

    from bench.presets import get_preset
    from bench.step import DENSE, OFFICIAL, run_step

    config = dataclasses.replace(get_preset("tiny").step, cuda_graphs=True)
    rows = list(run_step(config, torch.device("cuda"), log=lambda message: None))
    graphs = {row["method"]: row for row in rows if row["timer"] == "cuda-graph"}
    events = {row["method"]: row for row in rows if row["timer"] == "events"}
    assert graphs.keys() == events.keys()
    for method in (DENSE, OFFICIAL, "pool[reference]", "pool[triton]"):
        assert graphs[method]["status"] == "ok", graphs[method]["reason"]
        assert graphs[method]["median_ms"] > 0 and graphs[method]["peak_memory_mib"] is None
    assert graphs[DENSE]["ratio_to_dense_lora"] == 1.0
