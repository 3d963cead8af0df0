"""Timers: the same interface on CPU (time.perf_counter) and CUDA (events, optionally CUDA graphs).

A benchmark is a callable `step(buffer_index)` that runs one iteration on input buffer `buffer_index`; the
buffers are made before timing (random-number generation never runs inside a timed loop) and rotated so that
consecutive iterations read different memory (on GPU: enough buffers to overflow the L2 cache).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Iterable

import torch

Step = Callable[[int], object]


@dataclasses.dataclass
class Measurement:
    """Times of one benchmark in milliseconds: median and the 20th/80th percentiles (the spread), over `samples`
    timed iterations; peak_memory_mib is the CUDA peak while it ran (None on CPU, where torch does not track it)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    samples: int
    peak_memory_mib: float | None = None


@dataclasses.dataclass
class TimingConfig:
    """warmup: untimed iterations first, and at least warmup_seconds of them (a GPU's clocks ramp up over
    milliseconds, longer than a few iterations of a 20 us kernel take); min_samples/max_samples and target_seconds
    bound the timed iterations (stop after target_seconds once min_samples are done). graph_iterations: how many
    consecutive iterations one CUDA graph holds (each replay's time is divided by it), so that the fixed cost of a
    replay and of its event pair is shared: at 10-20 us per layer call a few microseconds are the 1.10x margin."""

    warmup: int = 3
    min_samples: int = 5
    max_samples: int = 200
    target_seconds: float = 0.5
    warmup_seconds: float = 0.0
    graph_iterations: int = 1


def _percentile(sorted_values: list[float], fraction: float) -> float:
    position = fraction * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(times_ms: list[float], peak_memory_mib: float | None = None) -> Measurement:
    if not times_ms:
        raise ValueError("summarize() needs at least one timed iteration")
    ordered = sorted(times_ms)
    return Measurement(
        median_ms=statistics.median(ordered), p20_ms=_percentile(ordered, 0.2), p80_ms=_percentile(ordered, 0.8),
        min_ms=ordered[0], samples=len(ordered), peak_memory_mib=peak_memory_mib,
    )  # fmt: skip


def _warm_up(step: Step, n_buffers: int, config: TimingConfig, synchronize: Callable[[], object] = lambda: None):
    """config.warmup iterations, then more until warmup_seconds have passed on the host clock (the device, which
    ends its work later than the host issues it, is as busy at least); then waits for the device."""
    started = time.perf_counter()
    done = 0
    while done < config.warmup or time.perf_counter() - started < config.warmup_seconds:
        step(done % n_buffers)
        done += 1
    synchronize()


def time_cpu(step: Step, n_buffers: int, config: TimingConfig) -> Measurement:
    """Wall-clock time of each iteration with time.perf_counter (CPU tensors: ops run synchronously)."""
    _warm_up(step, n_buffers, config)
    times_ms: list[float] = []
    started = time.perf_counter()
    while len(times_ms) < config.max_samples:
        t0 = time.perf_counter()
        step(len(times_ms) % n_buffers)
        times_ms.append((time.perf_counter() - t0) * 1e3)
        if len(times_ms) >= config.min_samples and time.perf_counter() - started > config.target_seconds:
            break
    return summarize(times_ms)


def _cuda_peak_mib(run_once: Callable[[], object]) -> float:
    """Peak CUDA memory (MiB) allocated while `run_once` runs, above what was allocated before it."""
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_once()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def _time_with_events(replay: Step, n_buffers: int, config: TimingConfig) -> list[float]:
    """One pair of CUDA events around each iteration; the host waits only at the end of each batch of events."""
    times_ms: list[float] = []
    started = time.perf_counter()
    batch = max(1, min(config.min_samples, 10))
    while len(times_ms) < config.max_samples:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
        for offset, (start, end) in enumerate(events):
            start.record()
            replay((len(times_ms) + offset) % n_buffers)
            end.record()
        torch.cuda.synchronize()
        times_ms.extend(start.elapsed_time(end) for start, end in events)
        if len(times_ms) >= config.min_samples and time.perf_counter() - started > config.target_seconds:
            break
    return times_ms[: config.max_samples]


def time_cuda(step: Step, n_buffers: int, config: TimingConfig) -> Measurement:
    """CUDA events around each iteration after warm-up; peak memory of one iteration."""
    _warm_up(step, n_buffers, config, torch.cuda.synchronize)
    peak = _cuda_peak_mib(lambda: step(0))
    return summarize(_time_with_events(step, n_buffers, config), peak)


def time_cuda_graph(step: Step, n_buffers: int, config: TimingConfig) -> Measurement:
    """The step captured once per buffer as a CUDA graph (launch overhead removed), then replayed and timed.

    Raises whatever capture raises (e.g. an op that reads a value back to the host), so the caller can report
    why a method cannot be captured."""
    caller_stream = torch.cuda.current_stream()
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(caller_stream)
    with torch.cuda.stream(side_stream):  # warm-up off the capture stream, as torch.cuda.graphs recommends
        for i in range(max(config.warmup, 3)):
            step(i % n_buffers)
    caller_stream.wait_stream(side_stream)
    graphs = []
    per_graph = max(1, config.graph_iterations)
    try:
        # Graph i runs buffers i * per_graph, i * per_graph + 1, ...: replayed in turn, the graphs go through the
        # buffers in one continuous rotation, so a buffer comes back only after all the others. That rotation
        # closes after lcm(n_buffers, per_graph) iterations: n_buffers / gcd graphs hold it (16 buffers at 8 per
        # graph: 2 graphs, not 16 captures of the same iterations).
        for i in range(n_buffers // math.gcd(n_buffers, per_graph)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for j in range(per_graph):
                    step((i * per_graph + j) % n_buffers)
            graphs.append(graph)
    finally:
        # A failed capture leaves torch.cuda.graph's capture stream current (its exit stops at capture_end).
        torch.cuda.set_stream(caller_stream)
    for graph in graphs:  # every graph's first replay (it uploads the graph) happens here, untimed
        graph.replay()
    _warm_up(lambda i: graphs[i].replay(), len(graphs), config, torch.cuda.synchronize)
    # No peak memory here: a graph's tensors live in its private pool, allocated at capture, not at replay.
    times_ms = _time_with_events(lambda i: graphs[i].replay(), len(graphs), config)
    return summarize([time_ms / per_graph for time_ms in times_ms])


class TimeBudget:
    """A wall-clock budget for a whole run: benchmarks ask `allows(what)` before each group and skip the rest once
    it is spent (recorded in `skipped`), so the results written at the end exist even under an outer time limit.

    `what` names the group and is unique within a preset; `current` is the group being measured. Groups in `done`
    (a results folder has them already: `sweep --resume`) are skipped without being listed. `on_group` is called
    first at every group boundary, when the rows of the group before have all reached the caller: `sweep` writes
    its results so far there, so a run killed at its timeout keeps every finished group."""

    def __init__(self, minutes: float | None = None, done: Iterable[str] = (),
                 on_group: Callable[[], None] | None = None):  # fmt: skip
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.skipped: list[str] = []
        self.done, self.on_group = set(done), on_group
        self.current: str | None = None
        self.seen: set[str] = set()  # every group asked about: the groups the preset has now

    def allows(self, what: str) -> bool:
        self.seen.add(what)
        if self.on_group is not None:
            self.on_group()
        if what in self.done:
            return False
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped.append(what)
            return False
        self.current = what
        return True


def buffers_to_defeat_cache(bytes_per_buffer: int, device: torch.device, minimum: int = 2, maximum: int = 16) -> int:
    """How many input buffers to rotate: enough that together they are twice the GPU's L2 cache, at most `maximum`
    (2 on CPU). Inputs under about 7 MB (twice a 60 MB L2 over 16) therefore stay partly in L2 between calls, and the
    weights, one set per method, always do."""
    if device.type != "cuda":
        return minimum
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(minimum, min(maximum, math.ceil(2 * l2_bytes / max(bytes_per_buffer, 1))))


# Why a "backward" row has no cuda-graph time: the forward graph it differentiates is built outside the capture.
BACKWARD_NOT_CAPTURED = (
    "backward alone is not captured: its forward graph is built outside the capture; see forward+backward"
)


def timers_for(device: torch.device, cuda_graphs: bool) -> list[str]:
    """The timers a benchmark runs on `device`: perf_counter on CPU; CUDA events, then CUDA graphs if asked for."""
    if device.type != "cuda":
        return ["perf_counter"]
    return ["events", "cuda-graph"] if cuda_graphs else ["events"]


def measure(step: Step, n_buffers: int, device: torch.device, config: TimingConfig, cuda_graph: bool = False):
    """Dispatch to the right timer for the device."""
    if device.type == "cuda":
        return (time_cuda_graph if cuda_graph else time_cuda)(step, n_buffers, config)
    if cuda_graph:
        raise ValueError("CUDA-graph timing needs a CUDA device")
    return time_cpu(step, n_buffers, config)
