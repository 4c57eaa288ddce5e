"""The shape of the package: no import cycle (imports inside functions included), a command
line that starts without PyTorch, and choice lists equal to the registries that act on them."""

import ast
import subprocess
import sys
from pathlib import Path

import medseg
from medseg.config import LEGACY_SETTINGS, choices
from medseg.data import transforms
from medseg.losses import LOSSES, MULTI_CLASS_LOSSES
from medseg.model import PAPER_DECODER_STRIDE, backbone, decoder

SOURCE = Path(medseg.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each medseg module -> the medseg modules it imports anywhere in its file."""
    modules = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                # "from medseg.config import choices" imports the submodule itself
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first = last), or [] when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_the_package_has_no_import_cycle_lazy_imports_included():
    graph = import_graph()
    assert len(graph) > 40  # every module was found
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_help_and_a_typo_import_no_torch():
    probe = (
        "import sys\nfrom medseg.cli import main\n"
        "for argv in (['--help'], ['trian'], ['train', '--help'], ['predict', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'torchvision', 'albumentations', 'cv2') if m in sys.modules]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip().splitlines()[-1] == "none"
    assert "resnet50" in result.stdout  # the choice lists are in --help all the same


def test_import_medseg_is_lazy_and_its_names_resolve():
    probe = "import sys, medseg\nprint('torch' in sys.modules)\nprint(medseg.Predictor.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == ["False", "Predictor"]
    assert set(medseg.__all__) <= set(dir(medseg))


def test_choice_lists_are_the_registries_names():
    assert backbone.BACKBONES == choices.BACKBONES
    assert set(backbone.RESNETS) | set(backbone.EFFICIENTNETS) == set(choices.BACKBONES)
    assert backbone.VARIANTS == choices.VARIANTS
    assert decoder.DECODER_STRIDES == choices.DECODER_STRIDES
    assert tuple(LOSSES) == choices.LOSSES
    assert MULTI_CLASS_LOSSES == choices.MULTI_CLASS_LOSSES
    assert transforms.AUGMENTATIONS is choices.AUGMENTATIONS
    # Runs saved before the decoder stride was a setting used the paper's decoder.
    assert LEGACY_SETTINGS["decoder_stride"] == PAPER_DECODER_STRIDE
