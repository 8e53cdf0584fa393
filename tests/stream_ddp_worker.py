""" Streamed data under torchrun with 2 gloo ranks: train.py's own training loaders, then train.py end to end

    python -m torch.distributed.run --nproc_per_node=2 --master_port=PORT tests/stream_ddp_worker.py \\
        OUT WDS HF FOLDER PORT1 PORT2

For ``wds/digits`` in WDS and ``hfids/<HF>`` (the shards of tests/conftest.py) every rank builds its training loader
as train.py does (`_create_datasets`, `_create_loaders`) with ``--views-on-device`` (and for wds/ also with the
views made on the CPU) and reads epochs 0 and 1 (CPU views: epoch 0). It records how often the two views of a sample
are equal and which samples it read, as digests of their decoded pixels; rank 0 gathers them with the digests of
FOLDER's training images (the files the shards were written from). Then train.py trains a short epoch (100 samples)
on each data set (wds/: CPU views, hfids/: views on the device) into OUT/<name>_ddp, on the free ports PORT1 and
PORT2. Rank 0 writes OUT/result.json for tests/test_streaming.py.
"""
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timm_splitnet.data import create_dataset, create_decode_transform, set_data_epoch  # noqa: E402
from timm_splitnet.task import DataParallelTraining  # noqa: E402

COMMON = ['--model', 'splitnet_resnet110_s2', '--model-kwargs', 'layers=(1,1,1)', '--img-size', '8', '-b', '25',
          '--workers', '0', '--device', 'cpu', '--log-interval', '100', '--no-plot', '--lr', '0.1',
          '--warmup-epochs', '0']
DATA_CONFIG = dict(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation='bilinear',
                   crop_pct=1.0, crop_mode='center')


def load_train():
    spec = importlib.util.spec_from_file_location('splitnet_train_script_stream_ddp', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def equal_view_fraction(images: torch.Tensor, num_views: int = 2) -> float:
    """Fraction of the samples of a split-major batch whose views 0 and 1 are equal."""
    batch = images.shape[0] // num_views
    same = [torch.equal(images[i], images[batch + i]) for i in range(batch)]
    return sum(same) / batch


def read_epochs(train, args, parallel, device) -> dict:
    """This rank's training loader: its batch count, how often the views of a sample are equal, and (views on the
    device) the digests of the samples of epochs 0 and 1, in order."""
    dataset_train, _ = train._create_datasets(args)
    loader, _, _ = train._create_loaders(args, DATA_CONFIG, dataset_train, None, 2, device, parallel)
    result = dict(batches=len(loader), epochs=[], equal_views=[])
    for epoch in ((0, 1) if args.views_on_device else (0,)):
        set_data_epoch(loader.dataset, epoch)
        if args.views_on_device:
            loader.set_epoch(epoch)
            # the decoded images (no random op) identify the samples; the views are made from them on the device
            digests = [digest(img) for images, _ in loader.loader for img in images]
            batches = [next(iter(loader))]
        else:
            digests, batches = [], loader
        for images, target in batches:
            assert images.shape == (50, 3, 8, 8), images.shape
            assert len(target) == 25 or torch.equal(target[:25], target[25:])  # device views: one target per sample
            result['equal_views'].append(equal_view_fraction(images))
        result['epochs'].append(digests)
    return result


def main(out: str, wds: str, hf: str, folder: str, ports) -> None:
    train = load_train()
    data = {'wds': ['--dataset', 'wds/digits', '--data-dir', wds],
            'hfids': ['--dataset', f'hfids/{hf}', '--data-dir', str(Path(out) / 'hf_cache')]}
    parallel = device = first = None
    report = {}
    for name, argv in data.items():
        for views_on_device in ((False, True) if name == 'wds' else (True,)):
            args, _ = train._parse_args(COMMON + argv + ['--val-split', ''] + (
                ['--views-on-device'] if views_on_device else []))
            args.prefetcher = not args.no_prefetcher
            if parallel is None:
                parallel = DataParallelTraining(args.seed)
                device = parallel.init_device(args)
                first = args
            for key in ('distributed', 'world_size', 'rank', 'local_rank', 'device'):
                setattr(args, key, getattr(first, key))
            report[f'{name}_{"device" if views_on_device else "cpu"}'] = read_epochs(train, args, parallel, device)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        reference = create_dataset('', root=folder, split='train')
        reference.transform = create_decode_transform((3, 8, 8), 'pad')
        result = dict(ranks=gathered, folder=[digest(reference[i][0]) for i in range(len(reference))])
        with open(Path(out) / 'result.json', 'w') as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()

    # train.py end to end, under the same torchrun: it sets up (and tears down) a process group of its own, each on a
    # fresh rendezvous store (a port of its own) rather than torchrun's, which keeps the keys of the groups before
    for (name, extra), port in zip((('wds', []), ('hfids', ['--views-on-device'])), ports):
        os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE='False')
        train.main(COMMON + data[name] + extra + ['--epochs', '1', '--train-num-samples', '100', '--output', out,
                                                   '--experiment', f'{name}_ddp'])


if __name__ == '__main__':
    main(*sys.argv[1:5], ports=[int(p) for p in sys.argv[5:7]])
