from __future__ import annotations

from forwarder.schema import expected_files


def test_schemas_and_readme_tables_are_current() -> None:
    stale = [
        str(path)
        for path, content in expected_files().items()
        if not path.exists() or path.read_text() != content
    ]
    assert not stale, f"stale generated files (run python -m forwarder.schema): {stale}"
