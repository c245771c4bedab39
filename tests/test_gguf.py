"""Models from .gguf files: converted once into a model folder, with one-line errors."""

import pytest

from merge_distill.errors import UserError
from merge_distill.models import load_model, load_tokenizer


def test_a_broken_gguf_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match=r"^student '.*bad.gguf': cannot convert the GGUF file \(") as e:
        load_tokenizer(bad, what="student")
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # nothing half-converted is left


def test_a_gguf_file_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"needs gguf: pip install 'merge-distill\[gguf\]'"):
        load_model(tmp_path / "m.gguf", what="teacher")
