"""The shape of utils/: packages by concern that import only downwards, and library code that logs instead of printing."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {'': 0, 'darknet': 1, 'data': 2, 'eval': 3, 'train': 4}  # utils/*.py < darknet < data < eval < train
SCRIPTS = {'train', 'test', 'detect', 'models'}


def _package(module: str) -> str:
    """'utils.data.datasets' -> 'data'; 'utils.logs' -> ''."""
    parts = module.split('.')
    return parts[1] if len(parts) >= 3 else ''


def _modules():
    for path in sorted((ROOT / 'utils').rglob('*.py')):
        yield path, '.'.join(path.relative_to(ROOT).with_suffix('').parts), ast.parse(path.read_text())


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_utils_packages_import_only_downwards_and_no_script():
    upward = []
    for path, module, tree in _modules():
        here = LAYERS[_package(module)]
        for line, name in _imports(tree):
            if name.split('.')[0] in SCRIPTS:
                upward.append(f'{path.relative_to(ROOT)}:{line} imports the script {name}')
            elif name.startswith('utils.') and LAYERS.get(_package(name), 0) > here:
                upward.append(f'{path.relative_to(ROOT)}:{line} imports {name} from a later package')
    assert not upward, '\n'.join(upward)


def test_every_utils_module_sits_in_a_known_package():
    stray = [str(p.relative_to(ROOT)) for p, m, _ in _modules() if _package(m) not in LAYERS]
    assert not stray and all((ROOT / 'utils' / pkg / '__init__.py').is_file() for pkg in LAYERS if pkg)


def test_library_code_logs_instead_of_printing():
    prints = [f'{path.relative_to(ROOT)}:{node.lineno}' for path, _, tree in _modules() for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'print']
    assert not prints, 'print() in utils/ (use utils.logs.LOGGER): ' + ', '.join(prints)
