"""The package's private core is laid out one folder per pillar."""

from pathlib import Path

import stablejax

PACKAGE = Path(stablejax.__file__).resolve().parent
PILLARS = {"numerics", "layers", "optim", "debug", "demo"}
SHARED = {"__init__.py", "validation.py", "typing.py", "jaxpr_bind.py"}
PUBLIC = {"__init__.py", "__main__.py", "nn.py", "nnx.py", "losses.py", "optim.py", "debug.py"}


def _python_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix == ".py"}


def test_src_holds_the_pillar_folders_and_the_shared_files_only():
    src = PACKAGE / "_src"
    folders = {p.name for p in src.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == PILLARS
    assert _python_files(src) == SHARED
    for pillar in PILLARS:
        assert (src / pillar / "__init__.py").is_file(), pillar


def test_no_private_module_at_the_package_top_level():
    assert _python_files(PACKAGE) == PUBLIC


def test_no_file_name_repeats_its_folder_as_a_prefix():
    for pillar in PILLARS:
        for name in _python_files(PACKAGE / "_src" / pillar):
            assert not name.startswith(f"{pillar}_"), (pillar, name)


def test_demo_zoo_counts_as_user_code_and_the_rest_of_src_does_not():
    from stablejax._src.debug.source import is_user_file

    assert is_user_file(str(PACKAGE / "_src" / "demo" / "zoo.py"))
    assert not is_user_file(str(PACKAGE / "_src" / "demo" / "scenarios.py"))
    assert not is_user_file(str(PACKAGE / "_src" / "numerics" / "ops.py"))
