import os
import pickle

import numpy as np
import pytest
import torch

from elvis_cli.util.errors import InputError
from elvis_cli.util.safe_pickle import load_pickle


class _RunsCommand:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evals:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


def _dump(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("payload", [_RunsCommand, _Evals])
def test_refuses_code_execution_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _dump(tmp_path / "gnd_evil.pkl", {"gnd": [payload(marker)]})
    with pytest.raises(InputError, match=r"refusing to load .*gnd_evil\.pkl: it asks to build .*"):
        load_pickle(evil)
    assert not marker.exists()


def test_refusal_names_the_callable(tmp_path):
    evil = _dump(tmp_path / "x.pkl", _RunsCommand(tmp_path / "m"))
    with pytest.raises(InputError) as info:
        load_pickle(evil)
    assert f"{os.system.__module__}.system, which is not allowed" in str(info.value)


def test_refuses_a_malicious_payload_hidden_in_a_torch_storage(tmp_path):
    marker = tmp_path / "pwned"

    class _FakeStorage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(_RunsCommand(marker), protocol=2),)

    path = _dump(tmp_path / "nn.pkl", _FakeStorage())
    with pytest.raises(InputError, match="cannot read"):
        load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_and_nested_containers_round_trip(tmp_path, protocol):
    data = {
        "imlist": ["a", "b"],
        "gnd": [
            {"easy": np.array([0, 3], dtype=np.int64), "bbx": [1.5, 2.0, 30.0, 40.0]},
            {"ok": np.arange(5, dtype=np.int32).reshape(5), "junk": np.empty(0)},
        ],
        "scalars": (np.float32(0.25), np.int64(7), np.dtype("float16")),
        "matrix": np.linspace(0, 1, 12, dtype=np.float16).reshape(3, 4)[:, ::2],
        "set": {1, 2},
    }
    loaded = load_pickle(_dump(tmp_path / "d.pkl", data, protocol))
    assert loaded["imlist"] == ["a", "b"]
    np.testing.assert_array_equal(loaded["gnd"][0]["easy"], [0, 3])
    assert loaded["gnd"][1]["ok"].dtype == np.int32
    assert loaded["gnd"][0]["bbx"] == [1.5, 2.0, 30.0, 40.0]
    assert loaded["scalars"] == data["scalars"]
    np.testing.assert_array_equal(loaded["matrix"], data["matrix"])
    assert loaded["set"] == {1, 2}


def test_torch_shortlist_tensor_round_trips(tmp_path):
    q, k = 3, 5
    shortlist = torch.stack(
        [
            torch.rand(q, k).sort(dim=1, descending=True).values,
            torch.randint(0, 100, (q, k)).float(),
        ]
    )
    loaded = load_pickle(_dump(tmp_path / "nn_x.pkl", shortlist))
    assert isinstance(loaded, torch.Tensor)
    assert loaded.shape == (2, q, k)
    assert torch.equal(loaded, shortlist)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_pickle(tmp_path / "absent.pkl")
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes(pickle.dumps({"a": list(range(100))})[:20])
    with pytest.raises(InputError, match="not a valid pickle"):
        load_pickle(truncated)
    garbage = tmp_path / "text.pkl"
    garbage.write_text("this is not a pickle")
    with pytest.raises(InputError, match="not a valid pickle"):
        load_pickle(garbage)
