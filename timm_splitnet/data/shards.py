""" A map-style data set written as shards for the streaming readers: webdataset tars or Hugging Face parquet files

:func:`write_wds_shards` writes ``<split>-NNNNN.tar`` shards (``<key>.jpg`` + ``<key>.cls``) and ``_info.json``, the
layout timm's wds/ reader takes; :func:`write_hf_shards` writes ``data/<split>-NNNNN-of-MMMMM.parquet`` and a
``README.md`` data set card, the layout of a Hugging Face Hub data set, which timm's hfds/ and hfids/ readers load
from the folder (or from the Hub after an upload). Image files are copied byte for byte where the data set reads
files (timm's folder / tar readers); decoded images (e.g. scikit-learn's digits) are stored as JPEG. Training splits
are shuffled before sharding: a streaming reader only shuffles shards and a buffer of samples, so shards that each
held one class would give batches of few classes. See docs/data.md.
"""
import glob
import io
import json
import logging
import math
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .streaming import check_reader_installed

__all__ = ['dataset_class_names', 'iter_encoded_samples', 'write_hf_shards', 'write_wds_shards']

_logger = logging.getLogger(__name__)

_EXT = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}
_TRAIN_SPLITS = ('train', 'training')


def dataset_class_names(dataset: Any) -> Optional[List[str]]:
    """Class names in index order of a timm / torchvision / digits data set, None if it has none."""
    while dataset is not None:
        classes = getattr(dataset, 'classes', None)
        if classes is not None:
            return [str(c) for c in classes]
        class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
        if class_to_idx:
            return [str(name) for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        dataset = getattr(dataset, 'dataset', None)
    return None


def _file_reader(dataset: Any) -> Any:
    """The index reader of a timm ``ImageDataset`` (also inside a wrapper such as ``SkipBadSamples``), if any."""
    while dataset is not None:
        reader = getattr(dataset, 'reader', None)
        if reader is not None and hasattr(reader, '__getitem__') and hasattr(reader, 'filename'):
            return reader
        dataset = dataset.__dict__.get('dataset') if hasattr(dataset, '__dict__') else None
    return None


def _encode(img: Any, quality: int = 95) -> bytes:
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    if img.mode not in ('RGB', 'L'):
        img = img.convert('RGB')
    buffer = io.BytesIO()
    img.save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()


def iter_encoded_samples(dataset: Any, indices: Sequence[int]) -> Iterator[Tuple[int, str, bytes, int]]:
    """``(index, extension, encoded image, class index)`` of the samples at `indices`.

    Files read by a timm folder / tar reader are passed on as they are (extension from the file name); other data
    sets must return ``(image, target)`` with an untransformed image (PIL or array), which is encoded as JPEG.
    """
    reader = _file_reader(dataset)
    for index in indices:
        index = int(index)
        if reader is not None:
            file, target = reader[index][:2]
            try:
                data = file.read() if hasattr(file, 'read') else open(file, 'rb').read()
            finally:
                if hasattr(file, 'close'):
                    file.close()
            ext = _EXT.get(os.path.splitext(str(reader.filename(index)))[1].lower(), 'jpg')
        else:
            img, target = dataset[index][:2]
            data, ext = _encode(img), 'jpg'
        yield index, ext, data, -1 if target is None else int(target)


def _order(num_samples: int, split: str, shuffle: Optional[bool], seed: int) -> np.ndarray:
    if shuffle is None:
        shuffle = split in _TRAIN_SPLITS
    if shuffle:
        return np.random.RandomState(seed).permutation(num_samples)
    return np.arange(num_samples)


def _log_progress(split: str, shard: int, num_shards: int, path: str) -> None:
    """One line per shard for short splits, about every 5 % of the shards for long ones."""
    if num_shards <= 20 or (shard + 1) % max(1, num_shards // 20) == 0 or shard + 1 == num_shards:
        _logger.info(f'{split}: shard {shard + 1}/{num_shards} written ({path})')


def _replace_json(path: str, value: Dict[str, Any]) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def write_wds_shards(
        dataset: Any,
        output_dir: str,
        split: str = 'train',
        shard_size: int = 1000,
        shuffle: Optional[bool] = None,
        seed: int = 0,
        name: Optional[str] = None,
) -> Dict[str, Any]:
    """Write `dataset` as webdataset tar shards of `split` into `output_dir` and record them in ``_info.json``.

    Shards are ``<split>-00000.tar``, ... of `shard_size` samples (the last one may be smaller); each sample is
    ``<index>.jpg`` (or .png / .webp as read) and ``<index>.cls`` (its class index). ``_info.json`` gets the split's
    shard names, shard lengths and sample count, which timm's wds/ reader reads, plus ``num_classes`` and the class
    names when the data set has them; other splits already recorded there are kept. Shards of an earlier write of
    the same split are replaced.

    Args:
        dataset: Map-style data set (see :func:`iter_encoded_samples`).
        output_dir: Folder of the shards (created).
        split: Split name, e.g. 'train' or 'validation'.
        shard_size: Samples per shard.
        shuffle: Shuffle the samples before sharding (default: for training splits only).
        seed: Seed of that shuffle.
        name: Data set name recorded in ``_info.json`` (default: the folder's name).

    Returns:
        The split's entry of ``_info.json``.
    """
    check_reader_installed('wds/', packages_only=True)
    import webdataset as wds
    if shard_size < 1:
        raise ValueError(f'shard_size must be >= 1, got {shard_size}.')
    os.makedirs(output_dir, exist_ok=True)
    for old in glob.glob(os.path.join(output_dir, f'{glob.escape(split)}-[0-9][0-9][0-9][0-9][0-9].tar')):
        os.remove(old)
    order = _order(len(dataset), split, shuffle, seed)
    num_shards = max(1, math.ceil(len(order) / shard_size))
    filenames, lengths = [], []
    for shard in range(num_shards):
        picks = order[shard * shard_size:(shard + 1) * shard_size]
        filename = f'{split}-{shard:05d}.tar'
        path = os.path.join(output_dir, filename)
        with wds.TarWriter(path + '.tmp') as sink:
            for index, ext, data, target in iter_encoded_samples(dataset, picks):
                sink.write({'__key__': f'{index:08d}', ext: data, 'cls': target})
        os.replace(path + '.tmp', path)
        filenames.append(filename)
        lengths.append(len(picks))
        _log_progress(split, shard, num_shards, path)

    info_path = os.path.join(output_dir, '_info.json')
    info: Dict[str, Any] = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    info.setdefault('name', name or os.path.basename(os.path.abspath(output_dir)))
    classes = dataset_class_names(dataset)
    if classes:
        info['num_classes'] = len(classes)
        info['classes'] = classes
    entry = dict(name=split, num_samples=int(sum(lengths)), filenames=filenames, shard_lengths=lengths)
    info.setdefault('splits', {})[split] = entry
    _replace_json(info_path, info)
    return entry


_SHARD_NAME = re.compile(r'^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.(?P<format>parquet|arrow)$')


def _write_card(output_dir: str, features: Any) -> Dict[str, int]:
    """README.md with the data set card (features, splits and their sample counts, data files) of every split in
    ``output_dir/data``; returns the sample count of every split."""
    import pyarrow.parquet as pq
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    import pyarrow as pa
    counts: Dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(output_dir, 'data', '*-of-*.*'))):
        match = _SHARD_NAME.match(os.path.basename(path))
        if not match:
            continue
        if match['format'] == 'parquet':
            rows = pq.read_metadata(path).num_rows
        else:
            with pa.memory_map(path) as source:
                rows = sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        counts[match['split']] = counts.get(match['split'], 0) + rows
    splits = SplitDict()
    for split, count in counts.items():
        splits.add(SplitInfo(name=split, num_examples=count))
    info = DatasetInfo(features=features, splits=splits)
    card = DatasetCardData()
    DatasetInfosDict({'default': info}).to_dataset_card_data(card)
    card.configs = [dict(config_name='default', data_files=[
        dict(split=split, path=f'data/{split}-*') for split in counts])]
    tmp = os.path.join(output_dir, 'README.md.tmp')
    with open(tmp, 'w') as f:
        f.write(f'---\n{card.to_yaml()}\n---\n\nImage classification shards written by timm-splitnet '
                f'(timm_splitnet.data.write_hf_shards).\n')
    os.replace(tmp, os.path.join(output_dir, 'README.md'))
    return counts


def _write_arrow_stream(table: Any, path: str) -> None:
    import pyarrow as pa
    with pa.OSFile(path, 'wb') as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def write_hf_shards(
        dataset: Any,
        output_dir: str,
        split: str = 'train',
        shard_size: int = 1000,
        shuffle: Optional[bool] = None,
        seed: int = 0,
        file_format: str = 'parquet',
) -> Dict[str, int]:
    """Write `dataset` as Hugging Face parquet shards of `split` into ``output_dir/data`` and (re)write the card.

    Shards are ``data/<split>-00000-of-000NN.parquet`` (or ``.arrow``) with an ``image`` column (the encoded file)
    and a ``label`` column (a ``ClassLabel`` when the data set has class names); ``README.md`` lists every split's
    files and sample count, so ``--dataset hfids/<folder>`` knows the epoch length and ``hfds/<folder>`` loads it
    map-style. Shards of an earlier write of the same split are replaced.

    Args:
        dataset: Map-style data set (see :func:`iter_encoded_samples`).
        output_dir: Folder of the data set (created).
        split: Split name.
        shard_size: Samples per shard.
        shuffle: Shuffle the samples before sharding (default: for training splits only).
        seed: Seed of that shuffle.
        file_format: 'parquet' (what the Hub serves) or 'arrow' (Arrow IPC streams: no compression, and datasets 5
            streams them without the pause of several seconds it makes after a shuffled pass over parquet files).

    Returns:
        The sample count of every split now in the folder.
    """
    check_reader_installed('hfds/', packages_only=True)
    import datasets
    if shard_size < 1:
        raise ValueError(f'shard_size must be >= 1, got {shard_size}.')
    if file_format not in ('parquet', 'arrow'):
        raise ValueError(f"file_format must be 'parquet' or 'arrow', got {file_format!r}.")
    data_dir = os.path.join(output_dir, 'data')
    os.makedirs(data_dir, exist_ok=True)
    for old in glob.glob(os.path.join(data_dir, f'{glob.escape(split)}-*-of-*.*')):
        match = _SHARD_NAME.match(os.path.basename(old))
        if match and match['split'] == split:
            os.remove(old)
    classes = dataset_class_names(dataset)
    features = datasets.Features({
        'image': datasets.Image(),
        'label': datasets.ClassLabel(names=classes) if classes else datasets.Value('int64'),
    })
    order = _order(len(dataset), split, shuffle, seed)
    num_shards = max(1, math.ceil(len(order) / shard_size))
    for shard in range(num_shards):
        rows: Dict[str, list] = dict(image=[], label=[])
        picks = order[shard * shard_size:(shard + 1) * shard_size]
        for index, ext, data, target in iter_encoded_samples(dataset, picks):
            rows['image'].append(dict(bytes=data, path=f'{index:08d}.{ext}'))
            rows['label'].append(target)
        path = os.path.join(data_dir, f'{split}-{shard:05d}-of-{num_shards:05d}.{file_format}')
        part = datasets.Dataset.from_dict(rows, features=features)
        if file_format == 'parquet':
            part.to_parquet(path + '.tmp')
        else:
            _write_arrow_stream(part.data.table, path + '.tmp')
        os.replace(path + '.tmp', path)
        _log_progress(split, shard, num_shards, path)
    return _write_card(output_dir, features)
