"""Parameter and FLOP counts of the registered models against the paper's Tables 2-4 (meta device, no memory)."""
import pytest
import torch

import timm
import timm_splitnet  # noqa: F401
from timm_splitnet.utils.flops import count_macs, count_params
from timm_splitnet.models.paper_tables import CODE_COUNTS, PAPER_TABLE, half_unit

ROWS = [pytest.param(e, id=f'{e.arch}-s{e.split_factor}-{e.num_classes}cls') for e in PAPER_TABLE]


def build(entry):
    with torch.device('meta'):
        return timm.create_model(f'splitnet_{entry.arch}_s{entry.split_factor}', num_classes=entry.num_classes)


def expected(entry, field):
    """The paper's value, or the authors' code count where the paper's cell does not match its architecture."""
    value, _ = CODE_COUNTS.get((entry.arch, entry.split_factor, field), (getattr(entry, field), ''))
    return value


@pytest.mark.parametrize('entry', ROWS)
def test_params_match_paper_within_2_percent(entry):
    params = count_params(build(entry), include_buffers=entry.with_buffers) / 1e6
    target = expected(entry, 'params_m')
    # 2 % plus half a unit of the paper's last printed digit (1.17 means [1.165, 1.175))
    assert abs(params - target) <= 0.02 * target + half_unit(target), f'{params:.3f}M vs paper {target}M'


@pytest.mark.slow  # counts the multiply-adds of full-size models (about 40 s in all)
@pytest.mark.parametrize('entry', ROWS)
def test_flops_match_paper_within_5_percent(entry):
    gmacs = count_macs(build(entry), (3, entry.img_size, entry.img_size)) / 1e9
    target = expected(entry, 'gflops')
    assert abs(gmacs - target) <= 0.05 * target + half_unit(target), f'{gmacs:.3f} GMACs vs paper {target}'
def test_wrn50_3_s2_is_two_wrn50_2_members():
    with torch.device('meta'):
        m = timm.create_model('splitnet_wrn50_3_s2')
        wrn50_2 = timm.create_model('wide_resnet50_2', stem_type='deep', stem_width=64, avg_down=True)
    assert len(m.models) == 2
    assert count_params(m.models[0]) == count_params(wrn50_2)
    assert count_params(m) / 1e6 == pytest.approx(138.0, rel=0.002)
