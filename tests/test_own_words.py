""" Help texts in our own words

Every ``help=`` string of the scripts (train.py, validate.py, benchmark.py, scripts/*.py) and of the library's
argument groups (timm_splitnet/) is compared with the help strings of timm's own scripts. timm's texts are kept only
as SHA-1 hashes (tests/timm_help_sha1.txt), so none of them sits in this repository in clear text.

A text is normalised the way the project's before-stop hook does it (whitespace collapsed, stripped, a final period
dropped, lower-cased); besides the whole text, its sentences / clauses and the part before a parenthesis are hashed
too (`text_variants`), on our side and on timm's, so a timm sentence with a clause added or its "(default: ...)"
trimmed off is caught as well. Pieces under 20 characters are ignored (flag-like fragments).

Regenerate the hash file from a checkout of huggingface/pytorch-image-models (keeping the hashes of other lists):

    python tests/test_own_words.py /path/to/pytorch-image-models [EXTRA_SHA1_LIST ...] > tests/timm_help_sha1.txt
"""
import ast
import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
HASH_FILE = Path(__file__).with_name('timm_help_sha1.txt')
MIN_CHARS = 20
# timm's top-level scripts whose help strings are hashed (those present in the checkout)
TIMM_SCRIPTS = ('train.py', 'validate.py', 'benchmark.py', 'inference.py', 'legacy_train.py', 'onnx_export.py',
                'onnx_validate.py', 'avg_checkpoints.py', 'clean_checkpoint.py', 'bulk_runner.py')


def normalize(text: str) -> str:
    """The before-stop hook's normal form: whitespace collapsed, stripped, no final period, lower case."""
    return re.sub(r'\s+', ' ', text).strip().rstrip('.').lower()


def text_variants(text: str) -> Set[str]:
    """The normalised text, its sentences / clauses and its part before the first parenthesis (>= 20 chars each)."""
    full = normalize(text)
    pieces = {full}
    pieces.update(re.split(r'(?<=[.;:])\s+', full))
    pieces.add(full.split(' (')[0])
    pieces = {normalize(p).rstrip(';:,').strip() for p in pieces} | {full}
    return {p for p in pieces if len(p) >= MIN_CHARS}


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def help_strings(path: Path) -> List[Tuple[int, str]]:
    """(line, text) of every `help=` keyword in a Python file; for a computed help, each string constant in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        for kw in getattr(node, 'keywords', None) or []:
            if kw.arg != 'help':
                continue
            try:
                value = ast.literal_eval(kw.value)
                texts = [value] if isinstance(value, str) else []
            except ValueError:  # e.g. 'refused: ' + REFUSED[...], an f-string: check its literal parts
                texts = [n.value for n in ast.walk(kw.value)
                         if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            found += [(kw.value.lineno, t) for t in texts]
    return found


def our_script_files() -> List[Path]:
    files = [REPO / name for name in ('train.py', 'validate.py', 'benchmark.py')]
    files += sorted((REPO / 'scripts').glob('*.py')) + sorted((REPO / 'timm_splitnet').rglob('*.py'))
    return [f for f in files if f.is_file() and 'help=' in f.read_text(encoding='utf-8')]  # parse only those


def load_hashes(path: Path = HASH_FILE) -> Set[str]:
    lines = path.read_text(encoding='utf-8').splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith('#')}


def copied_help_texts(files: Iterable[Path], hashes: Set[str], root: Path = REPO) -> Tuple[List[str], Dict[str, int]]:
    """'file:line: text' of every help text with a variant whose hash is in `hashes`, and the help count per file."""
    hits, counts = [], {}
    for path in files:
        name = str(path.relative_to(root))
        helps = help_strings(path)
        counts[name] = len(helps)
        hits += [f'{name}:{line}: {text!r}' for line, text in helps
                 if any(sha1(v) in hashes for v in text_variants(text))]
    return hits, counts


def test_hash_file_is_hashes_only():
    """The data file holds 40-hex-digit SHA-1s and comments: no clear text of timm's."""
    hashes = load_hashes()
    assert len(hashes) > 400, len(hashes)
    assert all(re.fullmatch(r'[0-9a-f]{40}', h) for h in hashes)


def test_scripts_help_is_own_words():
    """No help text of ours, nor a sentence / clause of it, is a help text (or the first part of one) of timm's
    scripts."""
    hits, counts = copied_help_texts(our_script_files(), load_hashes())
    # the scan sees the scripts' argument parsers (not an empty walk that passes trivially)
    assert counts['train.py'] > 100 and counts['validate.py'] > 20 and counts['benchmark.py'] > 15, counts
    assert counts['timm_splitnet/cli.py'] > 10, counts
    assert not hits, 'help texts that are timm\'s words; write them in our own:\n' + '\n'.join(hits)


@pytest.mark.parametrize('variant', [
    'Split the first axis into S views.',  # the exact text
    '  split the FIRST axis\tinto s views ',  # case, whitespace, no period
    'Split the first axis into S views (default: 4)',  # a default added
    'Members share the stem. Split the first axis into S views; then stack them',  # one sentence / clause of it
])
def test_copied_help_is_found(tmp_path, variant):
    """The check fails on a listed text however it is dressed up (a sentence of ours stands in for timm's)."""
    script = tmp_path / 'script.py'
    script.write_text(f'parser.add_argument("--x", help={variant!r})\n', encoding='utf-8')
    listed = {sha1(normalize('Split the first axis into S views.'))}
    assert copied_help_texts([script], listed, root=tmp_path) == ([f'script.py:1: {variant!r}'], {'script.py': 1})
    assert copied_help_texts([script], {sha1('another text of twenty characters')}, root=tmp_path)[0] == []


def test_validate_progress_line_keeps_its_layout():
    """validate.py's progress line is our code, but log readers parse its layout: fields, widths, two spaces apart."""
    from timm.utils import AverageMeter
    sys.path.insert(0, str(REPO))
    try:
        import validate
    finally:
        sys.path.remove(str(REPO))
    meters = [AverageMeter() for _ in range(4)]
    for meter, values in zip(meters, [(0.0, 0.5), (2.7654, 1.2346), (100., 50.), (75., 100.)]):
        for v in values:
            meter.update(v)
    line = validate.progress_line(7, 100, meters[0], 128, *meters[1:])
    assert line == ('Test: [   7/100]  Time: 0.500s (0.250s,  512.00/s)  Loss:  1.2346 (2.0000)  '
                    'Acc@1:  50.000 ( 75.000)  Acc@5: 100.000 ( 87.500)')


def _generate(timm_root: Path, extra_lists: List[Path]) -> None:
    hashes = set()
    scanned = []
    for name in TIMM_SCRIPTS:
        path = timm_root / name
        if path.is_file():
            scanned.append(name)
            for _, text in help_strings(path):
                hashes.update(sha1(v) for v in text_variants(text))
    for extra in extra_lists:
        hashes |= load_hashes(extra)
    commit = subprocess.run(['git', '-C', str(timm_root), 'log', '-1', '--format=%H (%cs)'],
                            capture_output=True, text=True).stdout.strip() or 'unknown'
    print('# SHA-1 of the help strings of timm\'s top-level scripts (huggingface/pytorch-image-models); no text.')
    print(f'# Commit {commit}; scripts: {", ".join(scanned)}.')
    print('# Each help text and its variants are hashed (tests/test_own_words.py text_variants): the text normalised')
    print('# as the before-stop hook does it (whitespace collapsed, stripped, final period dropped, lower case), its')
    print('# sentences / clauses and its part before the first parenthesis; >= 20 characters each.')
    if extra_lists:
        print(f'# Merged with the SHA-1 lists {", ".join(p.name for p in extra_lists)} (given on the command line).')
    print('# Regenerate: python tests/test_own_words.py TIMM_CHECKOUT [EXTRA_SHA1_LIST ...] > tests/timm_help_sha1.txt')
    for h in sorted(hashes):
        print(h)


if __name__ == '__main__':
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    _generate(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
