"""benchmark.py, the concurrent member runner and the latency plot (CPU, tiny batches, a few iterations)."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

import timm
import timm_splitnet  # noqa: F401
from timm_splitnet.parallel.concurrent import ConcurrentMembers, parse_devices

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repo-root scripts

import benchmark  # noqa: E402


MODEL = 'splitnet_resnet110_s2'
TINY_ARGS = ['--model-kwargs', 'layers=(1,1,1)', '--num-classes', '10']
FAST = ['-b', '2', '--num-warm-iter', '1', '--num-bench-iter', '2', '--rounds', '2', '--device', 'cpu']
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(autouse=True, scope='module')
def one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and the concurrent runner adds host threads of its own."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def tiny_model(name: str = MODEL, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, layers=(1, 1, 1), num_classes=10).eval()


# ----- ConcurrentMembers -----

@pytest.mark.parametrize('name,devices', [(MODEL, ['cpu', 'cpu']), ('splitnet_resnet110_s4', 'cpu,cpu')])
def test_concurrent_members_equal_sequential(name, devices):
    model = tiny_model(name)
    x = torch.randn(3, 3, 32, 32)
    with ConcurrentMembers(model, devices) as runner, torch.inference_mode():
        assert [d for _, d, _ in runner.members()] == [torch.device('cpu')] * model.split_factor
        torch.testing.assert_close(runner.forward_members(x), model.forward_members(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(runner(x), model(x), atol=1e-5, rtol=0)
        # [B, S*3, H, W]: member i sees view i
        views = torch.randn(2, 3 * model.split_factor, 32, 32)
        torch.testing.assert_close(runner.forward_members(views), model.forward_members(views), atol=1e-5, rtol=0)
        # the model's ensemble manner is used
        model.set_ensemble('max', ensemble_softmax=True)
        torch.testing.assert_close(runner(x), model(x), atol=1e-5, rtol=0)


def test_concurrent_members_grad_and_autocast():
    model = tiny_model()
    runner = ConcurrentMembers(model, 'cpu,cpu').train()
    logits = runner.forward_members(torch.randn(2, 3, 32, 32))  # grad mode of the caller reaches the threads
    assert logits.shape == (2, 2, 10) and logits.requires_grad
    logits.sum().backward()
    assert all(p.grad is not None for p in runner.parameters())
    assert all(p.grad is None for p in model.parameters())  # the placed members are copies
    runner.eval()
    with torch.inference_mode():
        assert ConcurrentMembers(model, ['cpu'], amp_dtype=torch.bfloat16)(torch.randn(1, 3, 32, 32)).dtype == \
            torch.bfloat16
        with torch.autocast('cpu', dtype=torch.bfloat16):  # the caller's autocast state reaches the threads
            assert runner.forward_members(torch.randn(1, 3, 32, 32)).dtype == torch.bfloat16
    runner.close()


def test_parse_devices_errors():
    assert parse_devices('cpu, cpu') == [torch.device('cpu')] * 2
    no_cuda_99 = r"Device 'cuda:99' (requested but CUDA is not available|does not exist)"  # with or without a GPU
    for bad, message in (('tpu', r"'tpu' is not a torch device"), ('cuda:99', no_cuda_99),
                         ('cpu,cuda:99', no_cuda_99), ('', 'at least one device')):
        with pytest.raises(ValueError, match=message):
            parse_devices(bad)
    with pytest.raises(TypeError, match='SplitNet'):
        ConcurrentMembers(timm.create_model('resnet18'), ['cpu'])


# ----- benchmark.py -----

INFER_KEYS = ('infer_samples_per_sec', 'infer_step_time', 'infer_step_time_median', 'infer_latency_ms',
              'infer_batch_size', 'infer_img_size', 'infer_gmacs', 'infer_peak_mem_mb')
TRAIN_KEYS = ('train_samples_per_sec', 'train_step_time', 'train_step_time_median', 'train_batch_size',
              'train_img_size', 'train_peak_mem_mb')


RATIO_KEYS = tuple(f'{kind}_vs_s1{end}' for kind in ('infer', 'train') for end in ('', '_lo', '_hi'))


# a known cost per member forward: a sleep (no CPU used, so it is the same on a busy machine; threads overlap it)
MEMBER_DELAY_MS = 40.


def delay_member_forwards(monkeypatch, delay_ms: float = MEMBER_DELAY_MS) -> list:
    """Every CIFAR ResNet member forward (the members of splitnet_resnet110_s*) first sleeps `delay_ms`; returns the
    list the sleeps are recorded in, as (thread id, start, end)."""
    import threading
    from timm_splitnet.models.cifar_resnet import CifarResNet
    forward, sleeps = CifarResNet.forward, []

    def delayed_forward(self, x):
        start = time.perf_counter()
        time.sleep(delay_ms / 1000.)
        sleeps.append((threading.get_ident(), start, time.perf_counter()))
        return forward(self, x)
    monkeypatch.setattr(CifarResNet, 'forward', delayed_forward)
    return sleeps


def test_benchmark_infer_train_concurrent_and_plot(tmp_path, monkeypatch, capsys):
    """The timers measure the members' work: with a known delay in every member forward, a sequential step takes
    at least S delays and the undivided network's at least one; the concurrent members (a host thread each) run at
    the same time: their delays overlap."""
    import threading
    out = tmp_path / 'results.json'
    png = tmp_path / 'latency.png'
    sleeps = delay_member_forwards(monkeypatch)
    rows = benchmark.main(['--model', MODEL, '--bench', 'both', '--devices', 'cpu,cpu', '--split-backend', 'loop',
                           '--results-file', str(out), '--results-format', 'json', '--plot', str(png)]
                          + FAST + TINY_ARGS)
    assert [(r['model'], r['split_mode']) for r in rows] == [
        ('splitnet_resnet110_s1', 'undivided'), (MODEL, 'sequential'), (MODEL, 'concurrent')]
    for r in rows:
        for key in INFER_KEYS + TRAIN_KEYS + ('param_count', 'split_mode', 'split_factor', 'split_backend', 'group'):
            assert key in r, key
        assert r['infer_batch_size'] == 2 and r['infer_img_size'] == 32 and r['infer_gmacs'] > 0
        assert r['infer_peak_mem_mb'] is None and r['group'] == MODEL  # CPU: no peak memory
    assert [r['split_factor'] for r in rows] == [1, 2, 2] and rows[2]['devices'] == 'cpu,cpu'
    undivided, sequential, concurrent = rows
    for r, delays in ((undivided, 1), (sequential, 2), (concurrent, 1)):  # member forwards one after the other
        for bench in ('infer', 'train'):
            assert r[f'{bench}_step_time_median'] >= delays * MEMBER_DELAY_MS, (r['split_mode'], bench)
            assert r[f'{bench}_step_time'] >= delays * MEMBER_DELAY_MS, (r['split_mode'], bench)
            # images per second: at most the batch over the delays of a step
            assert 0 < r[f'{bench}_samples_per_sec'] <= 2 / (delays * MEMBER_DELAY_MS / 1000.), (r['split_mode'], bench)
        assert r['infer_latency_ms'] >= delays * MEMBER_DELAY_MS / 2  # per image of the batch of 2
    # the concurrent members sleep on their own threads, at the same time (timing-free: the intervals overlap)
    main = threading.get_ident()
    workers = [(t, a, b) for t, a, b in sleeps if t != main]
    assert len({t for t, _, _ in workers}) == 2 and len(workers) >= 2 * 6  # 2 members x (1 + 2 steps) x 2 benches
    overlapping = [any(u != t and a < d and c < b for u, c, d in workers) for t, a, b in workers]
    assert sum(overlapping) >= 0.75 * len(workers), overlapping
    assert rows[1]['param_count'] == rows[2]['param_count']
    # all three timed in the same 2 paired rounds; the divided rows carry their ratio to S=1 with its band
    assert all(r['infer_rounds'] == r['train_rounds'] == 2 and r['infer_round_steps'] == 1 for r in rows)
    assert {r['train_clock'] for r in rows} == {'wall'}  # the concurrent run's host threads: elapsed time for all
    assert not any(k in rows[0] for k in RATIO_KEYS)
    for r in rows[1:]:
        for kind in ('infer', 'train'):
            assert 0 < r[f'{kind}_vs_s1_lo'] <= r[f'{kind}_vs_s1'] <= r[f'{kind}_vs_s1_hi'], r
        assert r['flop_bound_vs_s1'] == pytest.approx(rows[0]['infer_gmacs'] / r['infer_gmacs'], abs=1e-3)
        assert r['infer_noise'] == rows[0]['infer_noise'] >= 0  # S=1's round-to-round spread
    summary = capsys.readouterr().out.split('--result')[1]  # after the JSON: the table and the verdicts
    assert 'infer vs S=1' in summary and 'baseline' in summary
    assert f'resnet110 S=2 (loop) infers at {rows[1]["infer_vs_s1"]:.2f}x' in summary
    assert 'resnet110 S=2 (loop, concurrent) infers at' in summary
    assert json.loads(out.read_text()) == [dict(r) for r in rows]
    assert png.read_bytes()[:8] == PNG_MAGIC

    replot = tmp_path / 'replot.png'
    benchmark.main(['--plot-from', str(out), '--plot', str(replot)])
    assert replot.read_bytes()[:8] == PNG_MAGIC


def test_benchmark_wildcard_csv_and_plain_model(tmp_path):
    out = tmp_path / 'results.csv'
    rows = benchmark.main([
        '--model', 'splitnet_resnet110_s[14]', '--bench', 'infer', '--no-compare-undivided', '--results-file',
        str(out)] + FAST + TINY_ARGS)
    assert [(r['model'], r['split_mode'], r['split_factor']) for r in rows] == [
        ('splitnet_resnet110_s1', 'sequential', 1), ('splitnet_resnet110_s4', 'sequential', 4)]
    assert not any(k.startswith('train_') for k in rows[0])
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith('model,split_mode') and 'infer_samples_per_sec' in lines[0]

    plain = benchmark.main([
        '--model', 'resnet18', '--bench', 'infer', '--img-size', '32', '-b', '1', '--num-warm-iter', '0',
        '--num-bench-iter', '1', '--device', 'cpu'])
    assert len(plain) == 1 and plain[0]['split_mode'] == 'single' and plain[0]['split_factor'] is None
    assert plain[0]['param_count'] == pytest.approx(11.69, abs=0.01) and plain[0]['infer_gmacs'] > 0


def test_benchmark_backends_in_the_same_rounds():
    rows = benchmark.main(['--model', MODEL, '--bench', 'infer', '--split-backend', 'loop,packed'] + FAST + TINY_ARGS)
    assert [(r['split_factor'], r['split_backend'], r['split_mode']) for r in rows] == [
        (1, 'loop', 'undivided'), (2, 'loop', 'sequential'), (2, 'packed', 'sequential')]
    assert all('infer_vs_s1_lo' in r for r in rows[1:]) and all(r['infer_rounds'] == 2 for r in rows)
    assert {r['infer_clock'] for r in rows} == {'process_time'}  # one intra-op thread (the module's fixture)


def expect_error(argv, *fragments):
    with pytest.raises(SystemExit) as e:
        benchmark.main(argv)
    message = str(e.value.code)
    assert message.startswith('benchmark.py: error:'), message
    for fragment in fragments:
        assert fragment in message, message


def test_benchmark_bad_inputs(tmp_path):
    expect_error(['--model', 'splitnet_resnet11_s2'] + FAST, 'unknown model', 'splitnet_resnet110_s2')
    expect_error(['--model', 'splitnet_nothing*'] + FAST, 'no registered model matches')
    expect_error(['--model', MODEL, '--devices', 'cpu,cuda:99'] + FAST + TINY_ARGS, 'cuda:99')
    expect_error(['--model', MODEL, '--devices', 'tpu'] + FAST + TINY_ARGS, 'tpu')
    expect_error(['--model', MODEL, '--precision', 'float8'] + FAST, 'float8')
    expect_error(['--model', MODEL, '--split-backend', 'nope'] + FAST + TINY_ARGS, 'nope')
    expect_error(['--model', MODEL, '--rounds', '0'] + TINY_ARGS, '--rounds')
    expect_error(['--model', MODEL, '--split-backend', 'auto', '--torchcompile', 'eager'] + FAST + TINY_ARGS,
                 '--torchcompile with --split-backend auto')
    expect_error(['--plot-from', str(tmp_path / 'missing.json'), '--plot', str(tmp_path / 'x.png')], 'not found')
    # no model at all is the default comparison now (tests/test_timm_tools.py)
