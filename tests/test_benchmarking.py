""" The paired-rounds timing engine (timm_splitnet.utils.benchmarking) on fake clocks: known relative costs give
known ratios, the order rotates, the summary prints. No test reads the wall clock. """
import random
import time

import pytest
import torch
import torch.nn as nn

from timm_splitnet.utils.benchmarking import (
    Band, CudaEventClock, PairedRounds, Variant, band, clock_kind, device_clock, format_summary, ratio_fields, rotation,
    row_band, run_paired, steps_per_round, verdicts,
)


class FakeMachine:
    """A clock in seconds that only moves when a step runs: a step of cost c takes c x the machine's current load.

    The load drifts between rounds by up to 3x (other jobs come and go) and jitters by a few percent per step.
    """

    def __init__(self, seed: int = 0, drift: float = 3.0, jitter: float = 0.03):
        self.now = 0.
        self.rng = random.Random(seed)
        self.drift, self.jitter = drift, jitter
        self.load = 1.
        self.log = []

    def clock(self) -> float:
        return self.now

    def step(self, name: str, cost: float):
        def run():
            self.log.append(name)
            self.now += cost * self.load * (1 + self.rng.uniform(-self.jitter, self.jitter))
        return run

    def new_round(self, count: int, rounds: PairedRounds) -> None:
        self.load = self.rng.uniform(1., self.drift)


def test_known_relative_cost_gives_its_ratio_despite_drift():
    machine = FakeMachine(seed=1)
    variants = [Variant('once', machine.step('once', 0.1), items=8, clock=machine.clock),
                Variant('twice', machine.step('twice', 0.2), items=8, clock=machine.clock)]
    result = run_paired(variants, rounds=15, steps=2, warmup=1, progress=machine.new_round)
    ratio = result.ratio('twice', 'once')
    assert ratio.lo <= 0.5 <= ratio.hi and ratio.median == pytest.approx(0.5, abs=0.03)
    assert ratio.hi - ratio.lo < 0.06  # paired: the drift cancels in every round
    assert result.noise('once') > 0.3  # while the throughput itself moved a lot between rounds
    assert result.rounds == 15 and result.steps == 2 and len(result.step_times[0]) == 15
    assert 8 / (0.1 * 3.1) < result.throughput('once').median < 8 / 0.1 and result.ratio(0, 0).median == 1.


def test_a_layer_run_twice_costs_twice():
    """Real modules, a clock that counts calls of the shared layer: the model that runs it twice has ratio 0.5."""
    layer = nn.Linear(16, 16)
    calls = [0]
    layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    once, twice = nn.Sequential(layer), nn.Sequential(layer, layer)
    x = torch.randn(4, 16)

    def step(model):
        def run():
            with torch.inference_mode():
                model(x)
        return run

    clock = lambda: float(calls[0])  # noqa: E731
    result = run_paired([Variant('once', step(once), items=4, clock=clock),
                         Variant('twice', step(twice), items=4, clock=clock)], rounds=5, steps=3, warmup=2)
    assert result.ratio(1, 0) == Band(0.5, 0.5, 0.5)
    assert result.step_time(0).median == 1. and result.step_time(1).median == 2.
    assert calls[0] == 2 * 3 + 5 * 3 * 3  # warm-up, then 5 rounds of 3 steps of 1 + 2 calls


def test_the_order_rotates_and_steps_run_back_to_back():
    assert [rotation(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    machine = FakeMachine(drift=1., jitter=0.)
    variants = [Variant(n, machine.step(n, 1.), clock=machine.clock) for n in 'abc']
    result = run_paired(variants, rounds=3, steps=2, warmup=1)
    assert ''.join(machine.log) == 'abc' + 'aabbcc' + 'bbccaa' + 'ccaabb'
    assert result.orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_min_time_adds_rounds_and_bad_arguments():
    machine = FakeMachine(drift=1., jitter=0.)
    variants = [Variant(n, machine.step(n, 1.), clock=machine.clock) for n in 'ab']
    assert run_paired(variants, rounds=2, steps=1, min_time=9.).rounds == 5  # 2 s of steps per round
    threads = []
    run_paired([Variant('t', lambda: threads.append(torch.get_num_threads()), clock=machine.clock)], rounds=2,
               warmup=1, num_threads=1)
    assert threads == [1, 1, 1]  # warm-up and rounds on the pinned thread count
    with pytest.raises(ValueError, match='at least one variant'):
        run_paired([])
    with pytest.raises(ValueError, match='rounds >= 1'):
        run_paired(variants, rounds=0)
    assert steps_per_round(40, 10) == 4 and steps_per_round(3, 10) == 1


def test_band_quartiles_and_measurement():
    assert band([5, 1, 4, 2, 3]) == Band(3., 2., 4.)
    assert band([0.5]) == Band(0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        band([])
    rounds = PairedRounds(names=['a'], items=[2], step_times=[[0.1, 0.3, 0.2]], steps=4, orders=[[0]] * 3)
    m = rounds.measurement('a')
    assert m.median == pytest.approx(0.2) and m.number_per_run == 4 and len(m.times) == 3
    assert rounds.throughputs('a') == pytest.approx([20., 2 / 0.3, 10.])
    assert rounds.noise('a') == pytest.approx((15. - (2 / 0.3 + 10.) / 2) / 10.)


def test_device_clock_choice():
    assert device_clock(['cpu']) is device_clock([])  # torch.utils.benchmark's timer
    assert device_clock(['cpu'], cpu_time=True) is time.process_time
    assert [clock_kind(d, cpu_time=True) for d in (['cpu'], ['cuda:0'], ['cuda:0', 'cuda:1'], ['cpu', 'cuda:0'])] == [
        'process_time', 'cuda_events', 'synchronized_wall', 'cuda_events']
    assert clock_kind(['cpu']) == 'wall'
    if torch.cuda.is_available():
        clock = device_clock(['cuda:0'])
        assert isinstance(clock, CudaEventClock)
        t0 = clock()
        torch.randn(256, 256, device='cuda:0') @ torch.randn(256, 256, device='cuda:0')
        assert clock() >= t0


@pytest.mark.cuda
def test_cuda_event_clock_twice_the_work():
    a = torch.randn(2048, 2048, device='cuda')

    def work(n):
        def run():
            for _ in range(n):
                a @ a
        return run

    result = run_paired([Variant('once', work(4), devices=['cuda']), Variant('twice', work(8), devices=['cuda'])],
                        rounds=7, steps=3, warmup=2)
    assert 0.4 < result.ratio(1, 0).median < 0.6


ROWS = [
    dict(model='splitnet_wrn16_8_s1', split_factor=1, split_backend='loop', split_mode='sequential',
         infer_samples_per_sec=120.0, train_samples_per_sec=40.0, param_count=11.0, infer_gmacs=1.548,
         infer_rounds=10, infer_noise=0.05, train_rounds=10, train_noise=0.12),
    dict(model='splitnet_wrn16_8_s2', split_factor=2, split_backend='loop', split_mode='sequential',
         infer_samples_per_sec=110.0, train_samples_per_sec=35.2, param_count=12.4, infer_gmacs=1.75,
         **ratio_fields('infer_vs_s1', Band(0.9167, 0.9, 0.95)), **ratio_fields('train_vs_s1', Band(0.88, 0.85, 0.91)),
         flop_bound_vs_s1=0.885, infer_rounds=10, infer_noise=0.05, train_rounds=10, train_noise=0.12,
         train_clock='process_time'),
    dict(model='splitnet_wrn16_8_s4', error='out of memory at batch size 8'),
]


def test_summary_table_and_verdict():
    table = format_summary(ROWS)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ['model', 'S', 'backend', 'mode']
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    assert 'baseline' in lines[1] and '0.92 (0.90-0.95)' in lines[2] and '0.88 (0.85-0.91)' in lines[2]
    assert lines[2].endswith('0.89') and lines[3] == 'splitnet_wrn16_8_s4: error: out of memory at batch size 8'
    text = verdicts(ROWS)
    assert text[0] == ('wrn16_8 S=2 (loop) infers at 0.92x (0.90-0.95) and trains at 0.88x (0.85-0.91) of S=1; '
                       'the FLOP bound is 0.89x.')
    assert '10 paired rounds timed by process_time;' in text[1] and '12%' in text[1]
    assert row_band(ROWS[1], 'train_vs_s1') == Band(0.88, 0.85, 0.91) and row_band(ROWS[0], 'train_vs_s1') is None
    assert verdicts(ROWS[:1]) == []
