"""The package's public API: every stage importable from `elvis_cli`, loaded on first use."""

import subprocess
import sys

import pytest

import elvis_cli


def test_every_public_name_resolves_to_its_definition():
    for name in elvis_cli.__all__:
        value = getattr(elvis_cli, name)
        if name != "__version__":
            assert getattr(value, "__name__", name) == name, name
    assert elvis_cli.rerank.__module__ == "elvis_cli.retrieval.rerank"


@pytest.mark.subprocess
def test_importing_the_package_loads_no_heavy_library():
    code = ("import sys, elvis_cli; "
            "print(sorted(m for m in ('torch', 'faiss', 'h5py', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
