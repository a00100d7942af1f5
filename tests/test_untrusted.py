"""Files a user hands us may be hostile: no code runs while reading them, and no path in them leaves its folder.

Each hostile file here is first shown to be hostile (its payload runs when
loaded the ordinary way), so a test that then finds no marker file proves the
loader refused it, not that the payload was a dud.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from difftx_edge.io import CONFIG_SCHEMA, read_config
from difftx_edge.runtimes import Bundle
from difftx_edge.untrusted import inside, load_exported_program, sha256_tree


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for an attacker's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _save_program(path: Path, dynamic: bool = False) -> torch.export.ExportedProgram:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    program = torch.export.export(model, (torch.zeros(2, 4),), dynamic_shapes=shapes)
    torch.export.save(program, path)
    return program


def _rewrite(src: Path, dst: Path, member_suffix: str, change) -> None:
    """Copy the archive ``src`` to ``dst`` with the member ending in ``member_suffix`` replaced by
    ``change(old_bytes)``."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        hits = 0
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith(member_suffix):
                data, hits = change(data), hits + 1
            new.writestr(info, data)
    assert hits == 1, f"{src} has no single member ending in {member_suffix}"


def _member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(suffix)]
        return archive.read(name)


def evil_pt2(tmp_path: Path, marker: Path, name: str = "evil.pt2") -> Path:
    """A genuine torch.export.save archive whose sample_inputs member is a pickle that creates ``marker``."""
    good = tmp_path / f"good-{name}"
    _save_program(good)
    evil = tmp_path / name
    _rewrite(good, evil, "sample_inputs/model.pt", lambda _: pickle.dumps(_Payload(marker)))
    return evil


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "the hostile file ran its code"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # -P: never import the repository root's difftx_edge/ instead of the installed package.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-P", "-m", "difftx_edge", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def assert_refused(done: subprocess.CompletedProcess, *needles: str, codes: tuple[int, ...] = (2,)) -> None:
    err = done.stderr.strip()
    assert done.returncode in codes, (done.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# -----------------------------------------------------------------------------
# .pt2 files


def test_the_hostile_member_runs_code_when_unpickled_the_way_torch_falls_back_to(tmp_path):
    """The fixture is real: torch.export.load falls back to exactly this load when the safe one refuses."""
    marker = tmp_path / "pwned"
    evil = evil_pt2(tmp_path, marker)
    with pytest.raises(Exception):  # noqa: B017  (what it raises after running the payload does not matter)
        torch.load(io.BytesIO(_member(evil, "sample_inputs/model.pt")), weights_only=False)
    assert marker.exists()


def test_a_genuine_program_loads_and_computes_the_same(tmp_path):
    for dynamic in (False, True):
        path = tmp_path / f"good-{dynamic}.pt2"
        program = _save_program(path, dynamic)
        loaded = load_exported_program(path)
        x = torch.randn(2, 4)
        torch.testing.assert_close(loaded.module()(x), program.module()(x), rtol=0, atol=0)
        assert loaded.example_inputs[0][0].shape == (2, 4)


def test_a_pickle_in_sample_inputs_is_refused_without_running(tmp_path, marker):
    evil = evil_pt2(tmp_path, marker)
    with pytest.raises(ValueError, match=r"holds a pickle that is not plain tensors \(member "
                                         r"data/sample_inputs/model.pt\): refusing to load it") as err:
        load_exported_program(evil)
    assert "\n" not in str(err.value)


def test_a_pickled_weight_is_refused_without_running(tmp_path, marker):
    """torch.export.load unpickles a weight marked use_pickle with weights_only=False outright."""
    good = tmp_path / "good.pt2"
    _save_program(good)
    stage = tmp_path / "stage.pt2"

    def pickled(config: bytes) -> bytes:
        parsed = json.loads(config)
        entry = next(iter(parsed["config"].values()))
        entry["use_pickle"] = True
        return json.dumps(parsed).encode()

    _rewrite(good, stage, "data/weights/model_weights_config.json", pickled)
    name = next(iter(json.loads(_member(stage, "model_weights_config.json"))["config"].values()))["path_name"]
    evil = tmp_path / "evil.pt2"
    _rewrite(stage, evil, f"data/weights/{name}", lambda _: pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=f"holds a pickle that is not plain tensors \\(member data/weights/{name}"):
        load_exported_program(evil)


def test_a_symbolic_shape_that_is_python_is_refused_without_running(tmp_path, marker):
    """torch parses each symbolic shape with sympy.sympify, which evaluates the string."""
    good = tmp_path / "dynamic.pt2"
    _save_program(good, dynamic=True)
    assert b'"expr_str": "Symbol(' in _member(good, "models/model.json")
    evil = tmp_path / "evil.pt2"
    payload = f"open('{marker}', 'w') and Symbol("
    _rewrite(good, evil, "models/model.json",
             lambda data: data.replace(b'"expr_str": "Symbol(', b'"expr_str": "' + payload.encode(), 1))
    with pytest.raises(ValueError, match="has a symbolic shape .* that is not arithmetic: refusing to load it"):
        load_exported_program(evil)


def test_compiled_code_and_opaque_objects_are_refused(tmp_path):
    good = tmp_path / "good.pt2"
    _save_program(good)
    compiled = tmp_path / "compiled.pt2"
    with zipfile.ZipFile(good) as old, zipfile.ZipFile(compiled, "w") as new:
        root = old.namelist()[0].split("/")[0]
        for info in old.infolist():
            new.writestr(info, old.read(info))
        new.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ValueError, match="holds compiled code"):
        load_exported_program(compiled)


@pytest.mark.parametrize("inputs, kind", [([torch.zeros(2, 4)], "list"), ((torch.zeros(2, 4),), "tuple")])
def test_sample_inputs_that_are_not_args_and_kwargs_are_one_line(tmp_path, inputs, kind):
    good = tmp_path / "good.pt2"
    _save_program(good)
    odd = tmp_path / "odd.pt2"
    buffer = io.BytesIO()
    torch.save(inputs, buffer)
    _rewrite(good, odd, "sample_inputs/model.pt", lambda _: buffer.getvalue())
    with pytest.raises(ValueError, match=f"sample inputs that are a {kind}, not torch.export's"):
        load_exported_program(odd)


@pytest.mark.parametrize("member, content", [("models/model.json", b"{not json"),
                                             ("models/model.json", b'{"graph_module": 3}'),
                                             ("data/weights/model_weights_config.json", b"[]")])
def test_a_damaged_member_is_one_line(tmp_path, member, content):
    good = tmp_path / "good.pt2"
    _save_program(good)
    damaged = tmp_path / "damaged.pt2"
    _rewrite(good, damaged, member, lambda _: content)
    with pytest.raises(ValueError, match="is not a readable torch.export (file|program)") as err:
        load_exported_program(damaged)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really", b"\x00" * 100])
def test_a_file_that_is_no_archive_is_one_line(tmp_path, content):
    path = tmp_path / "bad.pt2"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="re-save it with torch.export.save") as err:
        load_exported_program(path)
    assert "\n" not in str(err.value)


def test_a_pt2e_quantized_program_loads(tmp_path):
    """A legitimate int8 program calls torchao's quantize/dequantize ops: the loader registers them."""
    from difftx_edge.quantize import get_quantizer_spec, pt2e

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    example = torch.randn(4, 8)
    prepared = pt2e.prepare(pt2e.export_for_quantization(model, example),
                            get_quantizer_spec("xnnpack").quantizer(qat=False), qat=False)
    pt2e.calibrate(prepared, [torch.randn(4, 8) for _ in range(4)])
    batch = torch.export.Dim("batch", min=1, max=64)  # as quantize saves it: sympy's srepr in the shapes
    program = torch.export.export(pt2e.convert(prepared), (example,), dynamic_shapes=({0: batch},))
    path = tmp_path / "quantized.pt2"
    torch.export.save(program, path)
    assert b"quantized_decomposed" in _member(path, "models/model.json")
    loaded = load_exported_program(path)
    torch.testing.assert_close(loaded.module()(example), program.module()(example), rtol=0, atol=0)


def test_convert_refuses_a_hostile_pt2_in_one_line(tmp_path, marker):
    evil = evil_pt2(tmp_path, marker)
    done = cli("convert", str(evil), "--format", "onnx", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_refused(done, "evil.pt2 holds a pickle that is not plain tensors", "refusing to load it")
    assert not (tmp_path / "out" / "onnx-fp32").exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    from difftx_edge.tasks import TaskConfig
    from difftx_edge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(out=str(out), epochs=1, threads=1), TaskConfig("digits"),
          {"d_model": 16, "n_layers": 1, "n_heads": 2}, progress=False)
    return out


def test_export_refuses_a_hostile_quantized_program_with_a_consistent_config(small_run, tmp_path, marker):
    """The program's sha256 sits in quant_config.json, which whoever wrote the program rewrites too."""
    quantized = tmp_path / "int8"
    folder = quantized / "xnnpack"  # executorch's quantizer
    folder.mkdir(parents=True)
    evil = evil_pt2(tmp_path, marker, "quantized.pt2")
    (folder / "quantized.pt2").write_bytes(evil.read_bytes())
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    (folder / "quant_config.json").write_text(json.dumps({
        "program_sha256": sha, "input": {"shape": [1, 16, 4], "dtype": "float32"}}))
    (folder / "quant_report.json").write_text(json.dumps({"program_sha256": sha}))
    done = cli("export", "--run", str(small_run), "--format", "executorch", "--precision", "int8", "--quantized",
               str(quantized), "--out", str(tmp_path / "out"), "--threads", "1", cwd=tmp_path)
    # A program that could run code is bad input, refused before any format is built: one line, exit 2.
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "quantized.pt2 holds a pickle that is not plain tensors (member data/sample_inputs/model.pt): refusing " \
           "to load it" in err, err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Bundles: paths confined, manifests checked, artifacts hashed


def make_bundle(root: Path, content: bytes = b"model bytes", **manifest) -> Path:
    bundle = root / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(content)
    fields = {"format": "onnx", "precision": "fp32", "artifact": "model.onnx",
              "artifact_sha256": hashlib.sha256(content).hexdigest(),
              "inputs": [{"name": "x", "shape": [1, 16, 4], "dtype": "float32"}],
              "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]}
    (bundle / "manifest.json").write_text(json.dumps({**fields, **manifest}))
    return bundle


def test_a_sound_bundle_opens(tmp_path):
    bundle = Bundle.open(make_bundle(tmp_path))
    assert bundle.artifact == tmp_path / "bundle" / "model.onnx" and bundle.seq_len == 16


@pytest.mark.parametrize("relative", ["/etc/passwd", "../outside.onnx", "sub/../../x", "", ".", None, 3, ["a"]])
def test_inside_refuses_paths_that_leave_the_folder_or_are_not_paths(tmp_path, relative):
    with pytest.raises(ValueError, match="refusing it|expected a file name") as err:
        inside(tmp_path, relative, "artifact")
    assert "\n" not in str(err.value)


def test_inside_refuses_a_link_out_of_the_folder_and_keeps_one_within(tmp_path):
    folder, outside = tmp_path / "folder", tmp_path / "secret.onnx"
    folder.mkdir()
    outside.write_bytes(b"secret")
    (folder / "out.onnx").symlink_to(outside)
    (folder / "real.onnx").write_bytes(b"x")
    (folder / "in.onnx").symlink_to(folder / "real.onnx")
    with pytest.raises(ValueError, match="is a link out of the folder"):
        inside(folder, "out.onnx")
    assert inside(folder, "in.onnx") == folder / "in.onnx"
    assert inside(folder, "sub/new.onnx") == folder / "sub" / "new.onnx"


@pytest.mark.parametrize("manifest, needle", [
    ({"artifact": "/elsewhere/secret.onnx"}, "leaves the folder"),
    ({"artifact": "../../outside/x"}, "leaves the folder"),
    ({"artifact": None}, "artifact is None (NoneType), expected str"),
    ({"inputs": []}, "inputs is [] (list), expected at least one input"),
    ({"inputs": [{"name": "x", "shape": [], "dtype": "float32"}]}, "expected a batch dimension"),
    ({"inputs": [{"name": "x", "shape": ["a"], "dtype": "float32"}]}, "inputs[0].shape"),
    ({"inputs": [{"name": "x", "shape": [1], "dtype": "float99"}]}, "inputs[0].dtype"),
    ({"inputs": "x"}, "inputs is 'x' (str), expected list"),
    ({"artifact_sha256": None}, "artifact_sha256 is None"),
    ({"artifact_sha256": "0" * 64}, "does not match the manifest's artifact_sha256"),
])
def test_a_hostile_or_damaged_manifest_is_refused_in_one_line(tmp_path, manifest, needle):
    bundle = make_bundle(tmp_path, **manifest)
    with pytest.raises(ValueError) as err:
        Bundle.open(bundle)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_missing_sha256_is_refused(tmp_path):
    bundle = make_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["artifact_sha256"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lacks 'artifact_sha256'"):
        Bundle.open(bundle)


def test_a_truncated_artifact_is_refused_before_it_runs(tmp_path):
    bundle = make_bundle(tmp_path, content=b"0123456789" * 100)
    (bundle / "model.onnx").write_bytes(b"0123456789" * 50)
    with pytest.raises(ValueError, match="does not match the manifest's artifact_sha256 .truncated or replaced."):
        Bundle.open(bundle)


def test_a_link_out_of_the_bundle_is_refused_even_when_the_manifest_names_another_file(tmp_path):
    bundle = make_bundle(tmp_path)
    (tmp_path / "secret").write_text("secret")
    (bundle / "weights.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match=r"holds links to files outside it \(weights.bin\)"):
        Bundle.open(bundle)


def test_a_folder_artifact_is_hashed_to_its_nested_files(tmp_path):
    """An .mlpackage is a folder: replacing a file deep inside it must change the manifest's hash."""
    package = tmp_path / "model.mlpackage"
    (package / "Data").mkdir(parents=True)
    (package / "Manifest.json").write_text("{}")
    (package / "Data" / "weights.bin").write_bytes(b"\x01\x02")
    # Each file's relative path, size and bytes, in sorted path order: Data/ first.
    expected = hashlib.sha256(b"Data/weights.bin\x002\x00\x01\x02" + b"Manifest.json\x002\x00{}").hexdigest()
    assert sha256_tree(package) == expected
    (package / "Data" / "weights.bin").write_bytes(b"\x01\x03")
    assert sha256_tree(package) != expected


def test_a_folder_hash_counts_the_names_and_a_file_hash_is_its_bytes(tmp_path):
    """Moving bytes between files, or renaming one, changes a folder's hash; a single file hashes as
    sha256sum does, so the manifests of file artifacts written before folders counted names still verify."""
    one, other = tmp_path / "one.mlpackage", tmp_path / "other.mlpackage"
    for folder in (one, other):
        folder.mkdir()
    (one / "a").write_bytes(b"xy")
    (other / "b").write_bytes(b"xy")
    assert sha256_tree(one) != sha256_tree(other)
    (other / "b").rename(other / "a")
    (other / "a").write_bytes(b"x")
    (other / "b").write_bytes(b"y")
    assert sha256_tree(one) != sha256_tree(other)  # the same bytes, split across two files
    assert sha256_tree(one / "a") == hashlib.sha256(b"xy").hexdigest()


def test_bench_refuses_a_hostile_bundle_before_running_anything(tmp_path, capsys):
    from difftx_edge.runtimes.bench import BenchConfig, bench

    (tmp_path / "secret.onnx").write_bytes(b"not yours")
    bundle = make_bundle(tmp_path, artifact_sha256=hashlib.sha256(b"not yours").hexdigest(),
                         artifact=str(tmp_path / "secret.onnx"))
    with pytest.raises(ValueError, match="leaves the folder"):
        bench(BenchConfig(bundles=[str(bundle)], runs=1, warmup=0, plots=False, out=str(tmp_path / "o")),
              progress=False)


@pytest.mark.parametrize("manifest, needle", [({"inputs": []}, "inputs is [] (list), expected at least one input"),
                                             ({"artifact": None}, "artifact is None (NoneType), expected str")])
def test_bench_cli_on_a_bad_manifest_is_one_line(tmp_path, manifest, needle):
    done = cli("bench", str(make_bundle(tmp_path, **manifest)), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert_refused(done, needle)


def test_ssh_target_refuses_a_hostile_manifest_before_anything_is_uploaded(sshd, tmp_path):
    """The board is never even logged in to: sshd's log shows no new session."""
    from difftx_edge.runtimes.bench import BenchConfig, bench

    url, config = sshd
    log = Path(config).parent / "sshd.log"
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(b"private key material")
    logins = log.read_text().count("Accepted publickey")
    assert logins > 0  # the fixture's own probe logged in: the log does record sessions
    for hostile in ({"artifact": str(secret), "artifact_sha256": hashlib.sha256(secret.read_bytes()).hexdigest()},
                    {"artifact": "../secret.onnx"}):
        root = tmp_path / hostile["artifact"].replace("/", "_")
        bundle = make_bundle(root, **hostile)
        with pytest.raises(ValueError, match="leaves the folder"):
            bench(BenchConfig(bundles=[str(bundle)], target=url, ssh_config=config, remote_python=sys.executable,
                              runs=1, warmup=0, plots=False, out=str(tmp_path / "o")), progress=False)
    assert log.read_text().count("Accepted publickey") == logins


def test_ssh_upload_refuses_a_folder_with_a_link_out(sshd, tmp_path):
    from difftx_edge.runtimes.targets import make_target

    url, config = sshd
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "secret").write_text("secret")
    (folder / "link").symlink_to(tmp_path / "secret")
    with make_target(url, ssh_config=config, remote_python=sys.executable) as target:
        with pytest.raises(ValueError, match="holds links to files outside it"):
            target.stage({"source": folder})
        remote = Path(target._dir())  # the board is this machine
        assert not list(remote.rglob("link"))


# -----------------------------------------------------------------------------
# Run configs


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


GOOD = {"model": {"vocab_size": None, "input_dim": 4, "n_outputs": 10, "d_model": 16}, "task": {"name": "digits"},
        "train": {"epochs": 1}}


def test_a_config_without_a_schema_reads_as_version_1(tmp_path):
    assert read_config(write_config(tmp_path, GOOD))["model"]["d_model"] == 16
    assert read_config(write_config(tmp_path, {**GOOD, "schema": CONFIG_SCHEMA}))["task"]["name"] == "digits"


@pytest.mark.parametrize("change, needle", [
    ({"schema": CONFIG_SCHEMA + 1}, "was written by a newer difftx-edge (config schema 2; this one reads up to 1): "
                                    "upgrade difftx-edge"),
    ({"schema": "1"}, "schema is '1' (str), expected a positive int"),
    ({"model": {**GOOD["model"], "d_model": "abc"}}, "config.json: model.d_model is 'abc' (str), expected int"),
    ({"model": {**GOOD["model"], "window": True}}, "model.window is True (bool), expected int"),
    ({"model": {**GOOD["model"], "rotary_base": 10000}}, "model.rotary_base is not a field of ModelConfig"),
    ({"model": [1, 2]}, "config.json: model is [1, 2] (list), expected an object of ModelConfig fields"),
    ({"task": {"name": "digits", "seq_len": "16"}}, "task.seq_len is '16' (str), expected int or null"),
    ({"train": {"lr": "fast"}}, "train.lr is 'fast' (str), expected float"),
    ({"task": None}, "config.json: task is None (NoneType), expected an object of TaskConfig fields"),
])
def test_config_problems_name_the_field_and_the_type_expected(tmp_path, change, needle):
    with pytest.raises(ValueError) as err:
        read_config(write_config(tmp_path, {**GOOD, **change}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_evaluate_on_a_config_without_a_task_is_one_line(tmp_path):
    config = {key: value for key, value in GOOD.items() if key != "task"}
    done = cli("evaluate", "--run", str(write_config(tmp_path / "run", config)), cwd=tmp_path)
    assert_refused(done, "config.json lacks its 'task' section")


def test_train_writes_the_schema_version(small_run):
    assert json.loads((small_run / "config.json").read_text())["schema"] == CONFIG_SCHEMA


# -----------------------------------------------------------------------------
# npz data


@pytest.mark.parametrize("labels, tokens, needle", [
    (10**9, 1, "'labels' in .* go up to 1000000000: labels must be 0..K-1 with K <= 100000"),
    (10**12, 1, "go up to 1000000000000: labels must be 0..K-1"),
    (1, 10**12, "'tokens' in .* go up to 1000000000000: token ids must be at most 1048575"),
])
def test_npz_with_a_huge_label_or_token_id_is_one_line(tmp_path, labels, tokens, needle):
    from difftx_edge.tasks import TaskConfig, load_task

    y = np.arange(20) % 2
    y[3] = labels
    x = np.ones((20, 8), dtype=np.int64)
    x[5, 2] = tokens
    np.savez(tmp_path / "data.npz", labels=y, tokens=x)
    with pytest.raises(ValueError) as err:
        load_task(TaskConfig("npz", data=str(tmp_path / "data.npz")))
    assert re.search(needle, str(err.value)) and "\n" not in str(err.value)
