"""Parameter and FLOP counts of the registered models against the paper's Tables 2-4 (meta device, no memory)."""
import pytest
import torch

import timm
import timm_splitnet  # noqa: F401
from timm_splitnet.flops import count_macs, count_params
from timm_splitnet.paper import FLOP_EXCEPTIONS, PAPER_TABLE

ROWS = [pytest.param(e, id=f'{e.arch}-s{e.split_factor}-{e.num_classes}cls') for e in PAPER_TABLE]


def build(entry):
    with torch.device('meta'):
        return timm.create_model(f'splitnet_{entry.arch}_s{entry.split_factor}', num_classes=entry.num_classes)


@pytest.mark.parametrize('entry', ROWS)
def test_params_match_paper_within_2_percent(entry):
    params = count_params(build(entry), include_buffers=entry.with_buffers) / 1e6
    assert params == pytest.approx(entry.params_m, rel=0.02), f'{params:.3f}M vs paper {entry.params_m}M'


@pytest.mark.parametrize('entry', ROWS)
def test_flops_match_paper_within_5_percent(entry):
    if (entry.arch, entry.split_factor) in FLOP_EXCEPTIONS:
        pytest.skip(FLOP_EXCEPTIONS[(entry.arch, entry.split_factor)])
    gmacs = count_macs(build(entry), (3, entry.img_size, entry.img_size)) / 1e9
    assert gmacs == pytest.approx(entry.gflops, rel=0.05), f'{gmacs:.3f} GMACs vs paper {entry.gflops}'


def test_wrn50_3_s2_is_two_wrn50_2_members():
    with torch.device('meta'):
        m = timm.create_model('splitnet_wrn50_3_s2')
        wrn50_2 = timm.create_model('wide_resnet50_2', stem_type='deep', stem_width=64, avg_down=True)
    assert len(m.models) == 2
    assert count_params(m.models[0]) == count_params(wrn50_2)
    assert count_params(m) / 1e6 == pytest.approx(138.0, rel=0.002)
