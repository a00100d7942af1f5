"""Reading files a user hands us, which may be hostile: no code runs while reading them.

``torch.export.load`` is not safe on a file from elsewhere. In torch 2.13 it
unpickles an archive's sample inputs with ``weights_only=True`` and, when that
refuses, falls back to ``weights_only=False``; it unpickles pickled weights and
constants with ``weights_only=False`` outright, unpickles opaque constants with
:func:`pickle.loads`, loads AOTInductor shared libraries, and parses symbolic
shapes with :func:`sympy.sympify`, which evaluates its string. Each of these
runs code an attacker wrote.

:func:`load_exported_program` reads the archive itself instead. It reads the
file once into memory (what it checks is what it loads), refuses compiled code
and opaque objects, unpickles every pickle-bearing member with
``torch.load(weights_only=True)`` only, checks every symbolic expression
against a plain grammar, and hands the results to torch's own deserializer,
which then has no pickle left to load. The checks a bundle gets
(``inside`` in ``difftx_edge.runtimes.registry``, ``sha256_tree`` in
``difftx_edge.hashing``) live apart, since they also run on boards that have
neither torch nor the rest of difftx-edge.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

from difftx_edge.hashing import sha256_tree
from difftx_edge.runtimes.registry import inside

__all__ = ["Refused", "inside", "load_exported_program", "sha256_tree"]


class Refused(ValueError):
    """A file refused as unreadable or unsafe; the message is one line saying why and what to do."""


# The programs we load have one model, saved under this name by torch.export.save.
MODEL_NAME = "model"
# A symbolic shape is sympy arithmetic on named symbols, e.g. "Symbol('s31', positive=True, integer=True)" or
# "2*s0 + 1". Nothing else passes: no dots, brackets, other strings or names, which is all sympify's eval
# would need to reach anything but sympy.
_SYM_TOKEN = re.compile(r"\s*(?:([A-Za-z][A-Za-z0-9]*)|'([a-z]+\d+)'|(\d+(?:\.\d+)?(?:e-?\d+)?)"
                        r"|(\*\*|//|[-+*/%(),<>=!]=?|[&|~]))")
_SYM_NAME = re.compile(r"[a-z]+\d+")  # s0, u3, zuf1: the symbols torch.export names
# Names besides symbols: sympy's expression classes (see _sym_words) and Symbol's assumptions, written as
# keyword arguments.
_SYM_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                              "zero", "nonzero", "True", "False"})
_MAX_MEMBER_BYTES = 4 << 30  # no program we export is near this; a larger member is a zip bomb


def load_exported_program(path: str | os.PathLike):
    """Load a ``torch.export.save`` file that may be hostile, running none of its code while reading it.

    Args:
        path: the ``.pt2`` file.

    Returns:
        The ``torch.export.ExportedProgram``.

    Raises:
        ValueError: one line: the file is missing, not a torch.export archive, corrupt, or holds anything
            whose loading could run code (a pickle that is not plain tensors, compiled code, opaque objects,
            a symbolic shape that is not arithmetic).
    """
    path = Path(path)
    if not path.is_file():
        raise Refused(f"{path} does not exist: give a file written by torch.export.save")
    data = path.read_bytes()  # once: the bytes checked are the bytes loaded
    resave = "re-save it with torch.export.save from a trusted source"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as err:
        raise Refused(f"{path} is not a readable torch.export file (not a .pt2 archive): {resave}") from err
    for member in members:
        if member.file_size > _MAX_MEMBER_BYTES or member.compress_type not in (zipfile.ZIP_STORED,
                                                                                  zipfile.ZIP_DEFLATED):
            raise Refused(f"{path} has an oversized or unreadable member {member.filename!r}: {resave}")

    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import constants as pt2
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        with PT2ArchiveReader(io.BytesIO(data)) as reader:
            names = reader.get_file_names()
            if pt2.ARCHIVE_VERSION_PATH not in names or reader.read_string(pt2.ARCHIVE_VERSION_PATH) != \
                    pt2.ARCHIVE_VERSION_VALUE:
                raise Refused(f"{path} is not a torch.export archive of this torch's version "
                                 f"({pt2.ARCHIVE_VERSION_VALUE}): {resave}")
            compiled = [n for n in names if n.startswith((pt2.AOTINDUCTOR_DIR, pt2.MTIA_DIR))]
            if compiled:
                raise Refused(f"{path} holds compiled code ({compiled[0]}): refusing to load it, since loading "
                                 f"would run it; {resave} without AOTInductor")
            model_file = pt2.MODELS_FILENAME_FORMAT.format(MODEL_NAME)
            if model_file not in names:
                raise Refused(f"{path} holds no program named {MODEL_NAME!r}: {resave}")
            program_bytes = reader.read_bytes(model_file)
            program_json = json.loads(program_bytes)
            _check_sym_exprs(path, program_json)
            if b"quantized_decomposed" in program_bytes:
                _register_quantized_ops()
            program = _dict_to_dataclass(schema.ExportedProgram, program_json)
            state_dict = _payloads(path, reader, names, pt2.WEIGHTS_DIR, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT)
            constants = _payloads(path, reader, names, pt2.CONSTANTS_DIR, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT)
            inputs_file = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME)
            sample_inputs = _plain_pickle(path, reader.read_bytes(inputs_file), inputs_file) \
                if inputs_file in names else None
    except Refused:
        raise
    # What torch's archive reader and dataclass parsing raise on a damaged or crafted archive.
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError, AttributeError, AssertionError) as err:
        raise Refused(f"{path} is not a readable torch.export file ({type(err).__name__}): {resave}") from err
    if sample_inputs is not None and not (isinstance(sample_inputs, tuple) and len(sample_inputs) == 2
                                          and isinstance(sample_inputs[0], tuple)
                                          and isinstance(sample_inputs[1], dict)):
        raise Refused(f"{path} has sample inputs that are a {type(sample_inputs).__name__}, not torch.export's "
                         f"(args, kwargs) pair: {resave}")
    try:
        # Every argument is already plain data, so the deserializer has nothing left to unpickle.
        return ExportedProgramDeserializer(None).deserialize(program, state_dict, constants, sample_inputs)
    except Exception as err:  # a crafted graph can fail anywhere inside torch's deserializer: one line instead
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise Refused(f"{path} is not a readable torch.export program ({type(err).__name__}"
                         f"{': ' + first[:200] if first else ''}): {resave}") from err


def _register_quantized_ops() -> None:
    """Register the quantize/dequantize ops a PT2E-quantized program calls.

    Raises:
        ValueError: torchao, which defines them, is not installed.
    """
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise Refused("loading a quantized program needs torchao: pip install 'difftx-edge[executorch]' "
                         "(or any backend extra)")
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)


def _plain_pickle(path: Path, data: bytes, member: str):
    """Unpickle ``data`` with torch's weights-only unpickler; refuse, in one line, anything else."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about protocol 4, which torch.export.save itself writes
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise Refused(f"{path} holds a pickle that is not plain tensors (member {member}): refusing to load it, "
                         "since loading could run code; re-save it with torch.export.save from a trusted "
                         "source") from err
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise Refused(f"{path} has a corrupt member {member} ({type(err).__name__}): re-save it with "
                         "torch.export.save") from err


def _payloads(path: Path, reader, names: list[str], folder: str, config_format: str) -> dict:
    """The weights or constants of the model, as torch's ``_load_state_dict``/``_load_constants`` build them,
    with every pickled entry loaded weights-only and opaque objects refused."""
    import torch
    from torch._export.serde import schema
    from torch._export.serde.serialize import deserialize_size, deserialize_storage_offset, deserialize_stride
    from torch.export.pt2_archive import constants as pt2
    from torch.export.pt2_archive._package import _build_file_map, _load_payload_config

    legacy = f"{folder}{MODEL_NAME}.pt"
    if legacy in names:  # older archives: one torch.save'd dict
        loaded = _plain_pickle(path, reader.read_bytes(legacy), legacy)
        if not isinstance(loaded, dict):
            raise Refused(f"{path} has a corrupt member {legacy}: re-save it with torch.export.save")
        return loaded
    config_file = config_format.format(MODEL_NAME)
    if config_file not in names:
        raise Refused(f"{path} lacks {config_file}: re-save it with torch.export.save")
    config: schema.PayloadConfig = _load_payload_config(reader, config_file)
    file_map = _build_file_map(reader, config, folder)  # raw tensor bytes, no pickle
    loaded: dict = {}
    for fqn, meta in config.config.items():
        member = os.path.join(folder, meta.path_name)
        if meta.path_name.startswith((pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)):
            raise Refused(f"{path} holds a pickled object that is not plain tensors (member {member}): refusing "
                             "to load it, since loading could run code; re-save it with torch.export.save from "
                             "a trusted source")
        if meta.use_pickle:
            value = _plain_pickle(path, reader.read_bytes(member), member)
            if not isinstance(value, torch.Tensor):
                raise Refused(f"{path} has a member {member} that is not a tensor: re-save it with "
                                 "torch.export.save")
        else:
            if meta.tensor_meta is None:
                raise Refused(f"{path} has a member {member} without its tensor metadata: re-save it with "
                                 "torch.export.save")
            value = torch.as_strided(file_map[meta.path_name], size=deserialize_size(meta.tensor_meta.sizes),
                                     stride=deserialize_stride(meta.tensor_meta.strides),
                                     storage_offset=deserialize_storage_offset(meta.tensor_meta.storage_offset))
            if meta.is_param:
                value = torch.nn.Parameter(value, requires_grad=meta.tensor_meta.requires_grad)
        loaded[fqn] = value
    return loaded


def _check_sym_exprs(path: Path, node) -> None:
    """Refuse any symbolic shape expression that is not plain arithmetic on symbols: torch parses each with
    ``sympy.sympify``, which evaluates the string as Python."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr_str":
                    if not isinstance(value, str) or not _plain_sym_expr(value):
                        raise Refused(f"{path} has a symbolic shape {str(value)[:60]!r} that is not arithmetic: "
                                         "refusing to load it, since parsing it could run code; re-save it with "
                                         "torch.export.save from a trusted source")
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


@functools.cache
def _sym_words() -> frozenset[str]:
    """The names a symbolic shape may call: sympy's expression classes and torch's sympy functions.

    Each builds an expression from numbers and symbols; none reads a file, imports or evaluates a string.
    """
    import sympy
    import torch.utils._sympy.functions as torch_sympy

    names = set(_SYM_ASSUMPTIONS)
    for module in (sympy, torch_sympy):
        for name in dir(module):
            value = getattr(module, name)
            if not name.startswith("_") and isinstance(value, type) and issubclass(value, sympy.Basic):
                names.add(name)
    names.discard("Lambda")  # Lambda(x, ...) is harmless too, but no shape needs it
    return frozenset(names | {"oo", "zoo", "nan"})


def _plain_sym_expr(text: str) -> bool:
    position, end = 0, len(text.rstrip())
    if end > 10_000:
        return False
    while position < end:
        token = _SYM_TOKEN.match(text, position)
        if token is None:
            return False
        name = token.group(1)
        if name is not None and not _SYM_NAME.fullmatch(name) and name not in _sym_words():
            return False
        position = token.end()
    return True
