"""`pytorch_model.bin` without torch: bit-exact against `torch.load`, and safe against pickles.

Files are written by the real `torch.save`, then read with torch hidden (`sys.modules["torch"] =
None`, so any `import torch` fails) and compared with what `torch.load` gives. Hostile pickles are
assembled opcode by opcode inside a zip laid out like torch's; a well-formed one built the same way
is first shown to load in torch, so that the hostile ones differ from a valid file only in what
they smuggle in.
"""

from __future__ import annotations

import contextlib
import copyreg
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import free_jax  # noqa: E402
from free_jax import CheckpointError, testing  # noqa: E402
from free_jax.checkpoints.torch_pickle import is_legacy_format, read_torch_bin  # noqa: E402

# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def torch_hidden():
    """Within: `import torch` (or any torch submodule) raises ImportError, as without torch."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
            patch.setitem(sys.modules, name, None)
        yield


def read_without_torch(file: Path) -> dict[str, np.ndarray]:
    with torch_hidden():
        return read_torch_bin(file)


def torch_as_numpy(tensor) -> np.ndarray:
    """What the reader must give for `tensor`: its values, C-contiguous, bf16 as ml_dtypes."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def assert_bit_exact(got: dict[str, np.ndarray], file: Path) -> None:
    expected = torch.load(str(file), map_location="cpu", weights_only=True)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        want = torch_as_numpy(tensor)
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert got[name].tobytes() == want.tobytes(), name  # bits: NaN payloads, -0.0 included
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name


def owns_its_memory(array: np.ndarray) -> bool:
    return array.flags.owndata and array.base is None


def _same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def hf_v10(tmp_path_factory) -> Path:
    """Tied T5 v1.0 (safetensors): head, embedding and both stacks' embeddings share storage."""
    return testing.make_hf_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "v1.0", testing.tiny_config("v1.0"), seed=1
    )


@pytest.fixture(scope="module")
def hf_v11(tmp_path_factory) -> Path:
    """Untied T5 v1.1 (safetensors), with a separate `lm_head.weight`."""
    return testing.make_hf_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "v1.1", testing.tiny_config("v1.1"), seed=2
    )


def special_values(dtype) -> torch.Tensor:
    values = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0, -2.5, 1e-40, 65504.0]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64],
    ids=["float32", "float16", "bfloat16", "float64"],
)
def test_state_dict_is_read_bit_exactly(dtype, hf_v11, tmp_path):
    state = {
        k: v.to(dtype) for k, v in safetensors_torch.load_file(hf_v11 / "model.safetensors").items()
    }
    state["special"] = special_values(dtype)
    file = tmp_path / "pytorch_model.bin"
    torch.save(state, file)

    got = read_without_torch(file)

    expected_dtype = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}.get(dtype)
    assert got["special"].dtype == (expected_dtype or torch_as_numpy(state["special"]).dtype)
    assert all(owns_its_memory(a) for a in got.values())
    assert_bit_exact(got, file)


def test_shared_strided_and_unusual_tensors(hf_v10, tmp_path):
    # Tied v1.0: shared.weight, both embed_tokens and lm_head are one storage.
    model = testing.load_hf_reference(hf_v10)
    state = dict(model.state_dict())
    assert state["lm_head.weight"].data_ptr() == state["shared.weight"].data_ptr()
    embedding = state["shared.weight"]
    state.update(
        {
            "transposed": embedding.t(),  # a non-contiguous view of the same storage
            "offset_slice": embedding[3:7, 5:],  # a storage offset and a row stride
            "every_other": embedding[::2, ::3],
            "broadcast": torch.arange(3.0).expand(4, 3),  # stride 0
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "parameter": torch.nn.Parameter(torch.randn(3, 2)),
            "int64": torch.arange(-5, 5),
            "int32": torch.arange(7, dtype=torch.int32),
            "uint8": torch.arange(250, 256, dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "uint16": torch.tensor([1, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3
            "half_view": torch.randn(4, 4).half()[:, 1],
        }
    )
    file = tmp_path / "pytorch_model.bin"
    torch.save(state, file)

    got = read_without_torch(file)

    # The tied head comes back as the embedding itself, as torch.load shares their memory.
    assert got["lm_head.weight"] is got["shared.weight"]
    assert got["transposed"].flags.c_contiguous and owns_its_memory(got["transposed"])
    assert got["uint16"].dtype == np.uint16
    assert_bit_exact(got, file)


def test_big_endian_archive_is_byteswapped(tmp_path):
    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": special_values(torch.float16),
        "i64": torch.arange(-3, 3),
        "c64": torch.randn(3, dtype=torch.complex64),
    }
    little = tmp_path / "little.bin"
    torch.save(state, little)
    # The same archive as a big-endian machine writes it: each value of each storage record
    # byteswapped (each half of a complex value on its own). Storage keys are "0", "1", ... in
    # the order torch.save meets the tensors.
    words = {key: (t.element_size() // (2 if t.is_complex() else 1)) for key, t in state.items()}
    word_of_record = {f"data/{i}": f"<u{size}" for i, size in enumerate(words.values())}
    big = tmp_path / "big.bin"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            record = info.filename.split("/", 1)[1]
            if record == "byteorder":
                data = b"big"
            elif record in word_of_record:
                data = np.frombuffer(data, word_of_record[record]).byteswap().tobytes()
            dst.writestr(info, data)

    got = read_without_torch(big)

    assert got.keys() == state.keys()
    for name, tensor in state.items():
        assert got[name].tobytes() == torch_as_numpy(tensor).tobytes(), name
    assert_bit_exact(got, big)  # and torch.load reads the big-endian file the same way


def test_load_single_bin_without_torch_equals_the_safetensors_source(hf_v10, tmp_path):
    # transformers-style: the tied state dict straight from the model, shared storages and all.
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(hf_v10 / "config.json", directory)
    torch.save(testing.load_hf_reference(hf_v10).state_dict(), directory / "pytorch_model.bin")
    with_torch = free_jax.load(directory)

    with torch_hidden():
        without_torch = free_jax.load(directory)

    _same_params(without_torch.params, free_jax.load(hf_v10).params)
    _same_params(without_torch.params, with_torch.params)
    assert without_torch.config == with_torch.config == testing.tiny_config("v1.0")


def write_sharded_bin(source: Path, directory: Path, shards: int = 3) -> list[str]:
    """`source`'s safetensors as a transformers-style sharded `pytorch_model.bin` checkpoint."""
    directory.mkdir()
    shutil.copy(source / "config.json", directory)
    state = safetensors_torch.load_file(source / "model.safetensors")
    names = sorted(state)
    files = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    weight_map = {}
    for i, file in enumerate(files):
        part = {name: state[name] for name in names[i::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return files


def test_load_sharded_bin_without_torch(hf_v11, tmp_path):
    directory = tmp_path / "sharded"
    files = write_sharded_bin(hf_v11, directory)
    for file in files:
        assert_bit_exact(read_without_torch(directory / file), directory / file)
    with_torch = free_jax.load(directory)

    with torch_hidden():
        without_torch = free_jax.load(directory)

    _same_params(without_torch.params, free_jax.load(hf_v11).params)
    _same_params(without_torch.params, with_torch.params)
    assert "lm_head" in without_torch.params


def test_reader_never_imports_torch(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(3, 2).bfloat16(), "b": torch.ones(2)}, file)
    code = (
        "import sys\n"
        "from free_jax.checkpoints.hf import read_hf_weights\n"
        "from pathlib import Path\n"
        f"state = read_hf_weights(Path({str(tmp_path)!r}))\n"
        "assert sorted(state) == ['b', 'w'], state\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---------------------------------------------------------------------------- bad files


def test_legacy_format_names_the_alternatives_without_torch(hf_v11, tmp_path):
    directory = tmp_path / "legacy"
    directory.mkdir()
    shutil.copy(hf_v11 / "config.json", directory)
    state = safetensors_torch.load_file(hf_v11 / "model.safetensors")
    file = directory / "pytorch_model.bin"
    torch.save(state, file, _use_new_zipfile_serialization=False)
    assert is_legacy_format(file)
    # With torch installed, the legacy format is read through torch.load.
    _same_params(free_jax.load(directory).params, free_jax.load(hf_v11).params)

    with torch_hidden():
        with pytest.raises(CheckpointError, match=r"legacy serialization format.*install torch"):
            read_torch_bin(file)
        with pytest.raises(CheckpointError, match=r"legacy.*safetensors"):
            free_jax.load(directory)


def test_training_checkpoint_entry_is_named(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, file)
    with pytest.raises(CheckpointError, match=r"entry 'model' is not a tensor but a dict"):
        read_without_torch(file)
    torch.save([torch.ones(2)], file)
    with pytest.raises(CheckpointError, match=r"holds a list; expected a state dict"):
        read_without_torch(file)


@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint"])
def test_damaged_file_names_it(damage, tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a pickle")
    with pytest.raises(CheckpointError, match=r"cannot read weights file .*pytorch_model\.bin"):
        read_without_torch(file)


# ---------------------------------------------------------------------------- hostile pickles
#
# A pickle is a program: GLOBAL pushes `module.name`, REDUCE calls it. Built by hand so that
# nothing in this test ever imports or calls what the payload names.


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _value(value) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # without PROTO and STOP


def _call(function: bytes, *args: bytes) -> bytes:
    return function + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def _storage(key: str, numel: int, storage_type: str = "FloatStorage") -> bytes:
    fields = _value("storage") + _global("torch", storage_type) + _value(key) + _value("cpu")
    return b"(" + fields + _value(numel) + b"tQ"  # a tuple, as a persistent id


def _tensor(storage: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    hooks = _call(_global("collections", "OrderedDict"))
    args = (_value(offset), _value(size), _value(stride), _value(False), hooks)
    return _call(_global("torch._utils", "_rebuild_tensor_v2"), storage, *args)


def _state_dict(entries: dict[str, bytes]) -> bytes:
    items = b"".join(_value(name) + value for name, value in entries.items())
    return b"\x80\x02" + _call(_global("collections", "OrderedDict")) + b"(" + items + b"u."


def _torch_zip(file: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return file


def test_hand_built_archive_is_valid(tmp_path):
    # The control: built by these helpers, torch.load and the reader agree on it.
    values = np.arange(6, dtype=np.float32)
    pickled = _state_dict(
        {
            "w": _tensor(_storage("0", 6), 1, (2, 2), (1, 2)),
            "s": _tensor(_storage("0", 6), 5, (), ()),
        }
    )
    file = _torch_zip(tmp_path / "ok.bin", pickled, {"0": values.tobytes()})
    got = read_without_torch(file)
    np.testing.assert_array_equal(got["w"], [[1, 3], [2, 4]])
    assert_bit_exact(got, file)


def _shell(marker: Path) -> bytes:
    return _value(f"touch {marker}")


@pytest.mark.parametrize(
    "payload, refused",
    [
        (lambda m: b"\x80\x02" + _call(_global("os", "system"), _shell(m)) + b".", "os.system"),
        (
            lambda m: _state_dict(
                {
                    "w": _tensor(_storage("0", 1), 0, (1,), (1,)),
                    "evil": _call(_global("builtins", "eval"), _value(f"open({str(m)!r}, 'w')")),
                }
            ),
            "builtins.eval",
        ),
        (  # torch's own deserialiser: a classic way around a torch-only allowlist
            lambda m: (
                b"\x80\x02"
                + _call(_global("torch.storage", "_load_from_bytes"), _value(b"x"))
                + b"."
            ),
            "torch.storage._load_from_bytes",
        ),
        (  # the storage type slot of a persistent id
            lambda m: _state_dict(
                {
                    "w": _tensor(
                        b"(" + _value("storage") + _global("os", "system") + b"tQ", 0, (1,), (1,)
                    )
                }
            ),
            "os.system",
        ),
    ],
    ids=["os.system", "builtins.eval-in-a-state-dict", "torch._load_from_bytes", "in-storage-id"],
)
def test_pickle_naming_another_global_is_refused_unexecuted(payload, refused, tmp_path):
    marker = tmp_path / "executed"
    file = _torch_zip(tmp_path / "pytorch_model.bin", payload(marker), {"0": b"\0" * 4})
    with pytest.raises(CheckpointError, match=rf"`{refused}`: not a tensor-rebuilding global"):
        read_without_torch(file)
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_written_by_pickle_itself_is_refused(protocol, tmp_path):
    # GLOBAL, STACK_GLOBAL (protocol 4+) and INST-free REDUCE: the way real exploits are written.
    marker = tmp_path / "executed"
    state = {"w": _Exploit(marker)}
    file = _torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps(state, protocol=protocol))
    with pytest.raises(CheckpointError, match=r"(posix|os)\.system`: not a tensor-rebuilding"):
        read_without_torch(file)
    assert not marker.exists()


def test_extension_registry_opcode_is_refused(tmp_path):
    # EXT1 names a global through copyreg's registry; it must go through the same check.
    marker = tmp_path / "executed"
    copyreg.add_extension("os", "system", 0xF0)
    try:
        payload = b"\x80\x02\x82\xf0(" + _shell(marker) + b"tR."
        file = _torch_zip(tmp_path / "pytorch_model.bin", payload)
        with pytest.raises(CheckpointError, match=r"`os\.system`: not a tensor-rebuilding"):
            read_without_torch(file)
    finally:
        copyreg.remove_extension("os", "system", 0xF0)
    assert not marker.exists()


def test_state_of_a_stand_in_cannot_be_set(tmp_path):
    # BUILD on an allowed global would let a file rewire what later files are read with.
    payload = b"\x80\x02" + _global("torch", "FloatStorage") + b"}" + _value("dtype")
    payload += _value("x") + b"sb."
    file = _torch_zip(tmp_path / "pytorch_model.bin", payload)
    with pytest.raises(CheckpointError, match=r"set the state of torch\.FloatStorage"):
        read_without_torch(file)
    # And a valid file still reads as float32.
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(2)}, good)
    assert read_without_torch(good)["w"].dtype == np.float32


@pytest.mark.parametrize(
    "offset, size, stride, match",
    [
        (0, (4,), (1,), r"reaches element 3, past the storage's 3"),
        (2, (2,), (1,), r"reaches element 3, past"),
        (0, (2, 2), (2, 1), r"reaches element 3, past"),
        (0, (1 << 40,), (0,), r"repeats its storage's 3 values.*refusing to expand"),
        (-1, (1,), (1,), r"invalid layout"),
        (0, (2,), (-1,), r"invalid layout"),
        (0, (2, 2), (1,), r"invalid layout"),
    ],
)
def test_tensor_outside_its_storage_is_refused(offset, size, stride, match, tmp_path):
    pickled = _state_dict({"w": _tensor(_storage("0", 3), offset, size, stride)})
    file = _torch_zip(tmp_path / "pytorch_model.bin", pickled, {"0": b"\0" * 12})
    with pytest.raises(CheckpointError, match=match):
        read_without_torch(file)


def test_storage_record_of_the_wrong_size_is_refused(tmp_path):
    pickled = _state_dict({"w": _tensor(_storage("0", 3), 0, (3,), (1,))})
    file = _torch_zip(tmp_path / "pytorch_model.bin", pickled, {"0": b"\0" * 8})
    with pytest.raises(CheckpointError, match=r"should hold 3 float32 values \(12 bytes\).*8"):
        read_without_torch(file)
    missing = _torch_zip(tmp_path / "missing.bin", pickled)
    with pytest.raises(CheckpointError, match=r"no record 'archive/data/0'"):
        read_without_torch(missing)
