"""scripts/mutate.py keeps up with the code: each planted bug still applies, and names real tests.

Running the mutations takes minutes (python scripts/mutate.py); this only checks that
they would run, so that a change to mistral/ which moves a pattern fails here first.
"""

from pathlib import Path

from mutate import MUTATIONS, PACKAGE, TESTS


def test_every_mutation_changes_its_file_in_one_place() -> None:
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    for m in MUTATIONS:
        source = (PACKAGE / m.file).read_text()
        assert m.mutated(source) != source, m.name  # mutated() raises unless exactly one match


def test_every_mutation_names_existing_test_files() -> None:
    for m in MUTATIONS:
        files = [Path(a.split("::")[0]) for a in m.pytest_args() if a.startswith(str(TESTS))]
        assert files and all(f.is_file() for f in files), m.name
