""" The package's shape: module size, import direction between layers, no import cycles

Every import counts, including deferred imports inside functions and imports under `TYPE_CHECKING`.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / 'timm_splitnet'
MAX_MODULE_LINES = 700

# lower number = lower layer; a module may import its own layer or lower ones only
LAYERS = {
    'version': 0, 'utils': 0, 'models': 1, 'data': 1, 'loss': 1,
    'parallel': 2, 'task': 3, 'cli': 4, 'plots': 4,
}
SCRIPT_PLUMBING = ('timm_splitnet.cli', 'timm_splitnet.plots')


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob('*.py'))}


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    if not level:
        return target
    base = module.split('.') if is_package else module.split('.')[:-1]
    base = base[:len(base) - (level - 1)]
    return '.'.join(base + ([target] if target else []))


def _imports(module: str, path: Path, known: Set[str]) -> Set[str]:
    """Package modules that `module` imports anywhere in its source (`from .x import y` counts x.y if a module)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == '__init__.py'
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module or '')
            names = [f'{target}.{a.name}' for a in node.names if f'{target}.{a.name}' in known] or [target]
        else:
            continue
        for name in names:
            # the deepest package module the name refers to
            while name and name not in known:
                name = name.rpartition('.')[0]
            if name and name != module and name.startswith('timm_splitnet'):
                found.add(name)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def _layer(module: str) -> int:
    parts = module.split('.')
    if len(parts) == 1:
        return max(LAYERS.values()) + 1  # the package root re-exports everything
    return LAYERS[parts[1]]


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + '.')


def test_every_module_belongs_to_a_layer():
    unlayered = sorted(m for m in _modules() if '.' in m and m.split('.')[1] not in LAYERS)
    assert not unlayered, f'modules in no layer (add their top-level package to LAYERS): {unlayered}'
    assert {m.split('.')[1] for m in _modules() if '.' in m} == set(LAYERS)  # and no layer without a module


def test_no_module_over_the_size_limit():
    too_long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    too_long = {m: n for m, n in too_long.items() if n > MAX_MODULE_LINES}
    assert not too_long, f'modules over {MAX_MODULE_LINES} lines: {too_long}'


def test_imports_point_down_the_layers():
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            if _is_ancestor(target, module):
                continue  # a module may use its own package's __init__ (e.g. registries)
            if _layer(target) > _layer(module):
                wrong.append(f'{module} -> {target}')
    assert not wrong, 'imports that point up the layers: ' + ', '.join(sorted(wrong))


def test_library_code_does_not_import_the_cli_helpers():
    users = [m for m, imported in _graph().items()
             if m not in SCRIPT_PLUMBING and m != 'timm_splitnet' and set(imported) & set(SCRIPT_PLUMBING)]
    assert not users, f'library modules importing the script helpers: {users}'


def _find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_import_cycle_between_modules():
    graph = _graph()
    # edges into a package __init__ from its own submodules are the package's re-exports, not dependencies
    graph = {m: {t for t in targets if not _is_ancestor(t, m)} for m, targets in graph.items()}
    cycle = _find_cycle(graph)
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


@pytest.mark.parametrize('graph, expected', [
    ({'a': {'b'}, 'b': {'a'}}, ['a', 'b', 'a']),
    ({'a': {'b'}, 'b': {'c'}, 'c': set()}, []),
])
def test_cycle_finder_finds_cycles(graph, expected):
    assert _find_cycle(graph) == expected
