"""executor's own GGUF header reader against gguf-py, the reference."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest

from executor.errors import ModelError
from executor.gguf.header import LongArray, read_header
from executor.gguf.types import FILE_TYPES, GGML_TYPES


def test_the_type_tables_are_gguf_pys():
    assert {t: (name, block, size) for t, (name, block, size) in GGML_TYPES.items()} == {
        int(t): (t.name, *gguf.GGML_QUANT_SIZES[t])
        for t in gguf.GGMLQuantizationType
        if t in gguf.GGML_QUANT_SIZES
    }
    assert {int(t): t.name.removeprefix("MOSTLY_") for t in gguf.LlamaFileType} == FILE_TYPES


def test_the_header_matches_gguf_py_on_the_default_model(default_model: Path):
    ours = read_header(default_model)
    reference = gguf.GGUFReader(default_model)
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    assert [t.n_bytes for t in ours.tensors] == [int(t.n_bytes) for t in reference.tensors]
    assert ours.data_start == reference.data_offset
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.fields[key]
        if isinstance(value, LongArray):  # the vocabulary: skipped, counted
            assert value.count == len(field.data)
        elif field.types[0] == gguf.GGUFValueType.STRING:
            assert value == field.contents()
        elif field.types[0] != gguf.GGUFValueType.ARRAY:
            assert value == pytest.approx(field.contents())


def test_a_changed_file_is_read_again(tmp_path: Path, default_model: Path):
    copy = tmp_path / "m.gguf"
    shutil.copyfile(default_model, copy)
    assert read_header(copy).file_size == default_model.stat().st_size
    with open(copy, "r+b") as f:
        f.truncate(copy.stat().st_size // 2)
    os.utime(copy, ns=(1, 1))  # a different mtime even on a coarse clock
    with pytest.raises(ModelError, match="truncated or corrupt"):
        read_header(copy)
