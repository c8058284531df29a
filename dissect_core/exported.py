"""Loading a ``torch.export`` archive (``.pt2``) as a dissectable network, running no code from the file.

``torch.export.load`` is not safe on an untrusted file (audited on torch 2.14.1,
``torch/export/__init__.py``, ``torch/export/pt2_archive/_package.py``,
``torch/_export/serde/serialize.py``, ``torch/utils/_pytree.py``,
``torch/export/_unlift.py``). What it can be made to run, and what stops it here:

- **Pickles.** Weights and tensor constants whose payload config says
  ``use_pickle`` (``torch.load(weights_only=False)``); custom objects
  (``torch._C._pickle_load_obj``) and opaque objects (``pickle.loads``); legacy
  ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` files; the sample
  inputs (``deserialize_torch_artifact`` tries ``weights_only=True``, then falls back
  to ``weights_only=False``); the pre-2.8 zip layout it falls back to when
  ``load_pt2`` raises. Refused by the member allowlist and the payload checks; the
  sample inputs are checked with ``torch.load(weights_only=True)`` and never handed
  to torch's loader.
- **Native code.** ``load_pt2`` loads AOTInductor packages (shared libraries under
  ``data/aotinductor/``). Refused by the member allowlist.
- **Python source in the JSON, no pickle needed** (found in this audit):
  every symbolic-shape string (``expr_str``) goes through ``sympy.sympify``, which
  ``eval``s it: ``__import__('os').system(...)`` in a tensor size runs during
  ``torch.export.load``. Each expression is parsed here with :mod:`ast` and only a
  small arithmetic grammar over ``Symbol(...)``/``Integer(...)`` is accepted.
  ``guards_code`` strings are pasted into a function and ``exec``'d by
  ``ExportedProgram.module()``: any guard code is refused. Treespecs (module call
  signatures) can name a module that ``importlib.import_module`` imports
  (``defaultdict`` contexts, ``__enum__`` objects): only tuples, lists and dicts
  with identifier keys are accepted.
- **Names pasted into generated Python.** ``torch.fx`` writes a non-identifier
  attribute segment as ``getattr(self.fc, "<segment>")`` without escaping, so a
  parameter name such as ``fc.w") if open(...) ... else getattr(self,"x`` runs
  when ``ExportedProgram.module()``'s forward is called; ``forward_arg_names``
  and keyword names are pasted into ``def forward(self, ...)``. Parameter, buffer,
  module and ``nn_module_stack`` names may hold only letters, digits, ``_`` and
  ``-`` per dotted segment; value and argument names must be identifiers.
- **Operators with side effects.** Node targets are resolved by attribute lookup
  under ``torch``/``operator``/``math``; the verifier accepts any ``OpOverload``,
  including ``aten::from_file`` (reads any file into a tensor) and
  ``aten::save``. Only ``torch.ops.aten`` overloads without a file-name argument
  and a few symbolic-size builtins are accepted; higher-order operators,
  extension ops and other namespaces are refused.

So this module never calls ``torch.export.load`` or ``load_pt2``. It opens the
zip once with :mod:`zipfile`, checks every member and every JSON document against
an allowlist (see :func:`check_exported_archive`), reads the raw weight bytes
itself into tensors (no unpickling), and then calls only the pieces of torch's
loader that unpickle nothing and see nothing but the already-checked objects:
``torch._export.serde.serialize._dict_to_dataclass`` (builds schema dataclasses
from the checked dict), ``ExportedProgramDeserializer().deserialize`` (given a
state dict and constants as dicts, so ``deserialize_torch_artifact`` returns them
untouched, and ``example_inputs=None``, so nothing is unpickled) and
``torch.export.unflatten`` (rebuilds submodules by name; its generated forward
code embeds only checked identifiers and operator names; it does not run
``guards_code``). These are private torch APIs: re-audit this list when torch is
upgraded.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .errors import ModelLoadError

__all__ = [
    "MAX_ARCHIVE_BYTES",
    "ExportedNetwork",
    "check_exported_archive",
    "load_exported",
]

MAX_ARCHIVE_BYTES = 8 << 30
"""Cap on the total uncompressed size of an archive (decompression bombs)."""

_MAX_MEMBERS = 100_000
_MAX_RATIO = 100  # uncompressed / compressed, per compressed member over 1 MiB
_MAX_JSON_BYTES = 512 << 20
_MAX_SMALL_BYTES = 1 << 10
_MAX_EXTRA_BYTES = 16 << 20
_MAX_SAMPLE_BYTES = 1 << 30
_MAX_EXPR_CHARS = 2000
_MAX_EXPR_NODES = 400

_DYNAMIC_HINT = (
    "export it with a dynamic batch dimension, e.g. "
    'torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), '
    "then torch.export.save(program, path)"
)

# --- the archive layout torch.export.save writes (torch 2.14), relative to the one root folder ---
_FIXED_MEMBERS = {  # member -> size cap
    "archive_format": _MAX_SMALL_BYTES,
    "archive_version": _MAX_SMALL_BYTES,
    "byteorder": _MAX_SMALL_BYTES,
    ".data/version": _MAX_SMALL_BYTES,
    ".data/serialization_id": _MAX_SMALL_BYTES,
    "models/model.json": _MAX_JSON_BYTES,
    "data/weights/model_weights_config.json": _MAX_JSON_BYTES,
    "data/constants/model_constants_config.json": _MAX_JSON_BYTES,
    "data/sample_inputs/model.pt": _MAX_SAMPLE_BYTES,
}
_REQUIRED_MEMBERS = (
    "archive_format",
    "archive_version",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)
_WEIGHT_RE = re.compile(r"data/weights/(weight_[0-9]{1,9})")
_CONSTANT_RE = re.compile(r"data/constants/(tensor_[0-9]{1,9})")
_EXTRA_RE = re.compile(r"extra/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd", ".cpp", ".cubin", ".o", ".a", ".ptx", ".hsaco")

# --- identifiers inside the program ---
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
# Dotted names end up inside generated Python (torch.fx writes ``getattr(self.fc, "<name>")`` unescaped for a
# segment that is not an identifier), so a segment may hold only letters, digits, "_" and "-" (RegNet's "block1-0").
_FQN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}(?:\.[A-Za-z0-9_-]{1,256}){0,63}")
_MODULE_FQN_RE = re.compile(
    r"(?:[A-Za-z0-9_-]{1,256}(?:@[0-9]{1,6})?(?:\.[A-Za-z0-9_-]{1,256}(?:@[0-9]{1,6})?){0,63})?"
)
_SYMBOL_RE = re.compile(r"[a-z]{1,8}_?[0-9]{1,9}")
_ATEN_TARGET_RE = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]{1,128})\.([A-Za-z0-9_]{1,128})")
_BUILTIN_TARGETS = frozenset(
    {
        "_operator.getitem",
        "_operator.add",
        "_operator.sub",
        "_operator.mul",
        "_operator.floordiv",
        "_operator.truediv",
        "_operator.mod",
        "_operator.neg",
        "_operator.pos",
        "_operator.eq",
        "_operator.ne",
        "_operator.lt",
        "_operator.le",
        "_operator.gt",
        "_operator.ge",
        "_operator.and_",
        "_operator.or_",
        "_operator.not_",
        "math.ceil",
        "math.floor",
        "math.trunc",
        "torch.sym_int",
        "torch.sym_float",
        "torch.sym_max",
        "torch.sym_min",
        "torch.sym_not",
        "torch.sym_ite",
    }
)
# Argument kinds that name code rather than data (higher-order operators only).
_FORBIDDEN_ARGUMENTS = frozenset({"as_graph", "as_operator", "as_custom_obj", "as_custom_objs"})
_INPUT_SPECS = frozenset({"user_input", "parameter", "buffer", "tensor_constant"})
_VERIFIERS = frozenset({"", "ATEN", "TRAINING"})
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})

# --- symbolic-size expressions: the sympy calls and keywords torch.export writes ---
_SYMPY_CALLS = frozenset(
    {
        "Symbol",
        "Integer",
        "Add",
        "Mul",
        "Max",
        "Min",
        "Mod",
        "FloorDiv",
        "CeilDiv",
        "CleanDiv",
        "ModularIndexing",
        "PythonMod",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
    }
)
_SYMBOL_KEYWORDS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero"}
)
_EXPR_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_EXPR_UNARYOPS = (ast.USub, ast.UAdd, ast.Not)
_EXPR_CMPOPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)

# ScalarType numbers of torch/_export/serde/schema.py -> dtypes whose raw bytes are read here.
_DTYPES = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_STRIDED_LAYOUT = 7


@dataclass(frozen=True)
class ExportedNetwork:
    """A network loaded from a ``torch.export`` archive.

    Attributes:
        module: ``torch.export.unflatten`` of the program, in eval mode: an
            ``nn.Module`` whose submodules keep the original dotted names
            (``layer4``, ``layer3.1``), so forward hooks by name work. Input
            ``[B, 3, H, W]``, any ``B``; output as the original model's.
        input_size: ``(H, W)`` of the image input the program was exported for.
        dynamic_batch: whether the batch dimension is symbolic (always ``True``:
            static-batch programs are refused).
    """

    module: nn.Module
    input_size: tuple[int, int]
    dynamic_batch: bool


@dataclass(frozen=True)
class _Archive:
    """The checked contents of an archive: parsed JSON documents and member table."""

    root: str
    members: dict[str, zipfile.ZipInfo]  # path relative to the root -> member
    program: dict[str, Any]
    weights: dict[str, dict[str, Any]]
    constants: dict[str, dict[str, Any]]


def check_exported_archive(path: str | os.PathLike[str]) -> None:
    """Check that a file is a plain ``torch.export.save`` archive that cannot run code.

    Nothing from torch reads the file before this check passes; the only torch reader it
    calls is ``torch.load(weights_only=True)``, on the sample inputs. Allowed members, all under
    one root folder: ``archive_format`` (``pt2``), ``archive_version`` (``0``),
    ``byteorder`` (``little``), ``.data/version``, ``.data/serialization_id``,
    ``models/model.json``, ``data/weights/model_weights_config.json``,
    ``data/weights/weight_<n>``, ``data/constants/model_constants_config.json``,
    ``data/constants/tensor_<n>``, ``data/sample_inputs/model.pt`` and
    ``extra/<name>``. Every weight and constant payload must be raw bytes
    (``use_pickle: false``, a strided tensor of a plain dtype); the program must use
    only ``torch.ops.aten`` operators (no file access) and simple symbolic sizes, and
    carry no guard code, custom objects or subgraphs.

    Args:
        path: The ``.pt2`` file.

    Returns:
        None.

    Raises:
        ModelLoadError: the file is missing, not a zip, too large, has an unsafe or
            unknown member, a pickled or native payload, a legacy layout, or a program
            that names code; the message names the problem.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        _check(zf, path)


def load_exported(path: str | os.PathLike[str]) -> ExportedNetwork:
    """Load a ``torch.export`` archive as an unflattened, hookable network.

    The archive is opened once; it is checked as in :func:`check_exported_archive`,
    then weights are read as raw bytes and the checked program is deserialized with
    torch's JSON deserializer (no unpickling) and unflattened.

    Args:
        path: A ``.pt2`` file written by ``torch.export.save`` for a program with one
            image input ``[B, 3, H, W]`` whose batch dimension ``B`` is dynamic.

    Returns:
        The :class:`ExportedNetwork`: ``module`` maps ``[B, 3, H, W]`` float images to
        the original model's outputs.

    Raises:
        ModelLoadError: the archive fails the check; the program has a static or bounded
            batch dimension, more than one input, a non-image input, or was exported in
            training mode; or torch cannot deserialize it.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        archive = _check(zf, path)
        input_size = _image_input_size(archive.program, path)
        state_dict = _read_payloads(zf, archive, archive.weights, "data/weights/", path, params=True)
        constants = _read_payloads(zf, archive, archive.constants, "data/constants/", path, params=False)
    # Only now does torch see anything, and only the checked dict and tensors.
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, archive.program)
        program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
        module = torch.export.unflatten(program)
    except Exception as exc:  # any failure of torch's deserializer is a bad file
        raise ModelLoadError(
            f"{path}: torch could not load the exported program: {_first_line(exc)}", path=str(path)
        ) from None
    module.eval()
    _name_submodules(module, program)
    return ExportedNetwork(module=module, input_size=input_size, dynamic_batch=True)


def _name_submodules(module: nn.Module, program: Any) -> None:
    """Give each unflattened submodule the class name of the module it was (``original_name``, as
    TorchScript modules have), read from the graph's ``nn_module_stack`` metadata."""
    names: dict[str, str] = {}
    for node in program.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
                names.setdefault(str(entry[0]), entry[1].rsplit(".", 1)[-1])
    for name, sub in module.named_modules():
        if name in names and not hasattr(sub, "original_name"):
            sub.original_name = names[name]


# ----------------------------------------------------------------------------------------------
# The archive


def _refuse(path: Path, problem: str) -> ModelLoadError:
    return ModelLoadError(f"refusing to load {path}: {problem}", path=str(path))


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ModelLoadError(f"exported program {path} does not exist", path=str(path))
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"exported program {path} is empty", path=str(path))
    if size > MAX_ARCHIVE_BYTES:
        raise _refuse(path, f"the file is {size} bytes, over the {MAX_ARCHIVE_BYTES}-byte limit")
    try:
        return zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, OSError, ...: whatever it is, it is not a readable zip
        raise _refuse(
            path, f"it is not a zip archive, so not a torch.export.save (.pt2) file ({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _check(zf: zipfile.ZipFile, path: Path) -> _Archive:
    try:
        return _check_archive(zf, path)
    except ModelLoadError:
        raise
    except Exception as exc:  # a JSON document of an unexpected shape
        raise _refuse(path, f"the archive is malformed ({type(exc).__name__}: {_first_line(exc)})") from None


def _check_archive(zf: zipfile.ZipFile, path: Path) -> _Archive:
    root, members = _check_members(zf, path)
    program = _read_json(zf, members["models/model.json"], path)
    weights = _payload_config(_read_json(zf, members["data/weights/model_weights_config.json"], path), path, "weight")
    constants = _payload_config(
        _read_json(zf, members["data/constants/model_constants_config.json"], path), path, "constant"
    )
    archive = _Archive(root=root, members=members, program=program, weights=weights, constants=constants)
    _check_small_members(zf, archive, path)
    for kind, config, prefix in (("weight", weights, "data/weights/"), ("constant", constants, "data/constants/")):
        for fqn, meta in config.items():
            _check_payload(archive, kind, fqn, meta, prefix, path)
    _check_program(program, path)
    _check_sample_inputs(zf, archive, path)
    return archive


def _check_members(zf: zipfile.ZipFile, path: Path) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    infos = zf.infolist()
    if not infos:
        raise _refuse(path, "the zip archive is empty")
    if len(infos) > _MAX_MEMBERS:
        raise _refuse(path, f"the archive has {len(infos)} members, over the {_MAX_MEMBERS} limit")
    total = 0
    names: set[str] = set()
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or "\x00" in name
            or re.match(r"[A-Za-z]:", name)
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise _refuse(path, f"zip member {name!r} has an unsafe path (absolute, '..', or empty parts)")
        if name in names:
            raise _refuse(path, f"zip member {name!r} appears twice")
        names.add(name)
        if info.flag_bits & 0x1:
            raise _refuse(path, f"zip member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(path, f"zip member {name!r} uses an unsupported compression method")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise _refuse(path, f"zip member {name!r} declares inconsistent sizes")
        if info.file_size > (1 << 20) and info.file_size > _MAX_RATIO * max(info.compress_size, 1):
            raise _refuse(
                path,
                f"zip member {name!r} expands {info.compress_size} bytes to {info.file_size} (a decompression bomb?)",
            )
        total += info.file_size
        if total > MAX_ARCHIVE_BYTES:
            raise _refuse(path, f"the archive expands to over {MAX_ARCHIVE_BYTES} bytes (a decompression bomb?)")

    if "serialized_exported_program.json" in names or "version" in names:
        raise _refuse(
            path, "it uses the legacy (torch < 2.8) torch.export layout, whose state dict is a pickle; re-save it"
        )
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _refuse(path, "it is not a torch.export.save archive (members are not under one root folder)")
    root = roots.pop()
    members = {info.filename[len(root) + 1 :]: info for info in infos}
    for rel, info in members.items():
        _check_member_name(rel, path)
        cap = _FIXED_MEMBERS.get(rel, _MAX_EXTRA_BYTES if rel.startswith("extra/") else None)
        if cap is not None and info.file_size > cap:
            raise _refuse(path, f"member {rel!r} is {info.file_size} bytes, over the {cap}-byte limit")
    missing = [m for m in _REQUIRED_MEMBERS if m not in members]
    if missing:
        raise _refuse(path, f"it is not a torch.export.save archive (missing {', '.join(missing)})")
    return root, members


def _check_member_name(rel: str, path: Path) -> None:
    """Refuse a member outside the layout, naming what it is when it is a known danger."""
    if rel in _FIXED_MEMBERS or _WEIGHT_RE.fullmatch(rel) or _CONSTANT_RE.fullmatch(rel) or _EXTRA_RE.fullmatch(rel):
        return
    if rel.startswith("data/aotinductor/") or rel.lower().endswith(_NATIVE_SUFFIXES):
        problem = f"member {rel!r} is AOTInductor compiled code or a native library, which torch would load"
    elif rel in ("data/weights/model.pt", "data/constants/model.pt"):
        problem = f"member {rel!r} is a legacy pickled weights/constants file (torch would unpickle it)"
    elif rel.startswith("data/constants/") and rel[len("data/constants/") :].startswith(("custom_obj_", "opaque_obj_")):
        problem = f"member {rel!r} is a custom/opaque object constant (torch would unpickle it)"
    elif rel.startswith("models/") or rel.startswith("data/sample_inputs/") or rel.endswith("_config.json"):
        problem = f"member {rel!r} belongs to a second program; only one program named 'model' is supported"
    elif rel.startswith(("data/executorch/", "data/mtia", "xl_model_weights/")):
        problem = f"member {rel!r} is an ExecuTorch/MTIA/external-weights payload, which is not supported"
    else:
        problem = f"member {rel!r} is not part of the torch.export.save layout"
    raise _refuse(path, problem)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, path: Path) -> bytes:
    if info.file_size > cap:
        raise _refuse(path, f"member {info.filename!r} is {info.file_size} bytes, over the {cap}-byte limit")
    try:
        with zf.open(info) as fh:
            data = fh.read(cap + 1)
    except Exception as exc:  # BadZipFile (bad CRC), zlib.error, OSError, ...
        raise _refuse(path, f"member {info.filename!r} is unreadable ({_first_line(exc)})") from None
    if len(data) > cap:
        raise _refuse(path, f"member {info.filename!r} is over the {cap}-byte limit")
    return data


def _read_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> dict[str, Any]:
    data = _read_member(zf, info, _MAX_JSON_BYTES, path)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(path, f"member {info.filename!r} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(doc, dict):
        raise _refuse(path, f"member {info.filename!r} is not a JSON object")
    return doc


def _check_small_members(zf: zipfile.ZipFile, archive: _Archive, path: Path) -> None:
    expected = {"archive_format": {b"pt2"}, "archive_version": {b"0"}, "byteorder": {sys.byteorder.encode()}}
    for rel, allowed in expected.items():
        if rel in archive.members:
            value = _read_member(zf, archive.members[rel], _MAX_SMALL_BYTES, path).strip()
            if value not in allowed:
                raise _refuse(path, f"{rel} is {value[:40]!r}, expected {sorted(allowed)[0]!r}")


def _payload_config(doc: dict[str, Any], path: Path, kind: str) -> dict[str, dict[str, Any]]:
    config = doc.get("config")
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise _refuse(path, f"the {kind} config is malformed (no 'config' mapping)")
    return config


def _check_payload(archive: _Archive, kind: str, fqn: str, meta: dict[str, Any], prefix: str, path: Path) -> None:
    if not _FQN_RE.fullmatch(fqn):
        raise _refuse(path, f"{kind} name {fqn[:80]!r} is not a dotted name")
    if meta.get("use_pickle") is not False:
        raise _refuse(path, f"{kind} {fqn!r} is stored as a pickle (use_pickle is not false); torch would unpickle it")
    name = meta.get("path_name")
    pattern = _WEIGHT_RE if kind == "weight" else _CONSTANT_RE
    if not isinstance(name, str) or not pattern.fullmatch(prefix + name):
        if isinstance(name, str) and name.startswith(("custom_obj_", "opaque_obj_")):
            raise _refuse(path, f"{kind} {fqn!r} is a custom/opaque object ({name}); torch would unpickle it")
        raise _refuse(path, f"{kind} {fqn!r} has an unexpected payload file {str(name)[:80]!r}")
    if prefix + name not in archive.members:
        raise _refuse(path, f"{kind} {fqn!r} points at missing member {prefix + name!r}")
    if not isinstance(meta.get("is_param"), bool):
        raise _refuse(path, f"{kind} {fqn!r} has no is_param flag")
    _tensor_layout(meta.get("tensor_meta"), f"{kind} {fqn!r}", path)


def _tensor_layout(tmeta: object, what: str, path: Path) -> tuple[torch.dtype, list[int], list[int], int, bool]:
    """Check a payload's tensor meta: plain dtype, strided, CPU/CUDA, static integer sizes."""
    if not isinstance(tmeta, dict):
        raise _refuse(path, f"{what} has no tensor meta")
    code = tmeta.get("dtype")
    dtype = _DTYPES.get(code) if isinstance(code, int) else None
    if dtype is None:
        raise _refuse(path, f"{what} has an unsupported dtype {code!r}")
    if tmeta.get("layout") != _STRIDED_LAYOUT:
        raise _refuse(path, f"{what} is not a dense strided tensor")
    device = tmeta.get("device")
    if not isinstance(device, dict) or device.get("type") not in ("cpu", "cuda"):
        raise _refuse(path, f"{what} is on an unsupported device {device!r}")

    def ints(values: object) -> list[int]:
        if not isinstance(values, list) or len(values) > 16:
            raise _refuse(path, f"{what} has malformed sizes or strides")
        return [_static_int(v, what, path) for v in values]

    sizes, strides = ints(tmeta.get("sizes")), ints(tmeta.get("strides"))
    offset = _static_int(tmeta.get("storage_offset"), what, path)
    if len(sizes) != len(strides) or any(v < 0 for v in (*sizes, *strides, offset)):
        raise _refuse(path, f"{what} has malformed sizes or strides")
    return dtype, sizes, strides, offset, bool(tmeta.get("requires_grad"))


def _static_int(value: object, what: str, path: Path) -> int:
    if isinstance(value, dict) and list(value) == ["as_int"]:
        v = value["as_int"]
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << 62):
            return v
    raise _refuse(path, f"{what} has a size, stride or offset that is not a plain integer")


def _check_sample_inputs(zf: zipfile.ZipFile, archive: _Archive, path: Path) -> None:
    """torch falls back to ``weights_only=False`` on the sample inputs: they must load without it."""
    info = archive.members.get("data/sample_inputs/model.pt")
    if info is None or info.file_size == 0:
        return
    data = _read_member(zf, info, _MAX_SAMPLE_BYTES, path)
    try:
        sample = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not plain tensors"
        raise _refuse(
            path,
            "the sample inputs (data/sample_inputs/model.pt) are not plain tensors: torch.load with "
            f"weights_only=True rejected them ({_first_line(exc)}), and torch's own loader would unpickle them",
        ) from None
    if not isinstance(sample, tuple | dict):
        raise _refuse(path, "the sample inputs are not a (args, kwargs) tuple")


# ----------------------------------------------------------------------------------------------
# The program (models/model.json)


def _check_program(program: dict[str, Any], path: Path) -> None:
    guards = program.get("guards_code", [])
    if guards:
        raise _refuse(path, "the program carries guard code (Python source that ExportedProgram.module() would exec)")
    verifiers = program.get("verifiers", [])
    if not isinstance(verifiers, list) or not all(isinstance(v, str) and v in _VERIFIERS for v in verifiers):
        raise _refuse(path, f"the program names unknown verifiers {verifiers!r}")
    ranges = program.get("range_constraints", {})
    if not isinstance(ranges, dict):
        raise _refuse(path, "the program's range constraints are malformed")
    for symbol, bounds in ranges.items():
        if not _SYMBOL_RE.fullmatch(symbol) or not isinstance(bounds, dict):
            raise _refuse(path, f"the program has a malformed range constraint {symbol[:40]!r}")
        for key in ("min_val", "max_val"):
            value = bounds.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise _refuse(path, f"range constraint {symbol!r} has a non-integer {key}")
    gm = program.get("graph_module")
    if not isinstance(gm, dict) or not isinstance(gm.get("graph"), dict) or not isinstance(gm.get("signature"), dict):
        raise _refuse(path, "models/model.json has no graph module")
    graph = gm["graph"]
    if graph.get("custom_obj_values"):
        raise _refuse(path, "the program uses custom objects (torch would unpickle them)")
    for table in ("tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values"):
        values = graph.get(table, {})
        if not isinstance(values, dict) or not all(_IDENT_RE.fullmatch(k) for k in values):
            raise _refuse(path, f"the program's {table} are malformed or have non-identifier names")
    try:
        for item in _walk(gm):
            _check_item(item, path)
    except RecursionError:
        raise _refuse(path, "models/model.json is nested too deeply") from None
    _check_signature(gm["signature"], path)
    calls = gm.get("module_call_graph", [])
    if not isinstance(calls, list):
        raise _refuse(path, "the program's module call graph is malformed")
    for entry in calls:
        if not isinstance(entry, dict) or not isinstance(entry.get("fqn"), str):
            raise _refuse(path, "the program's module call graph is malformed")
        if not _MODULE_FQN_RE.fullmatch(entry["fqn"]):
            raise _refuse(path, f"module name {entry['fqn'][:80]!r} is not a dotted name")
        signature = entry.get("signature")
        if signature is not None:
            if not isinstance(signature, dict):
                raise _refuse(path, "the program's module call graph is malformed")
            for key in ("in_spec", "out_spec"):
                _check_treespec(signature.get(key), path)
            # ExportedProgram.module() pastes these into "def forward(self, <names>)".
            arg_names = signature.get("forward_arg_names") or []
            if not isinstance(arg_names, list) or not all(
                isinstance(n, str) and _IDENT_RE.fullmatch(n) for n in arg_names
            ):
                raise _refuse(path, "the program's forward argument names are not identifiers")


def _walk(obj: object) -> Iterator[tuple[str, object, dict[str, Any]]]:
    """Yield ``(key, value, parent)`` for every key of every JSON object, depth first."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value, obj
            yield from _walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk(value)


def _check_item(item: tuple[str, object, dict[str, Any]], path: Path) -> None:
    key, value, parent = item
    if key in _FORBIDDEN_ARGUMENTS:
        raise _refuse(path, f"the program passes {key[3:]} arguments (subgraphs/operators/objects are not supported)")
    if key == "expr_str":
        _check_expr(value, path)
    elif key in ("name", "as_name") and isinstance(value, str) and not _IDENT_RE.fullmatch(value):
        raise _refuse(path, f"the program has a value named {value[:80]!r}, which is not an identifier")
    elif key == "metadata" and isinstance(value, dict) and "nn_module_stack" in value:
        _check_module_stack(value["nn_module_stack"], path)
    elif key == "target" and isinstance(parent.get("inputs"), list) and isinstance(parent.get("outputs"), list):
        _check_target(value, path)
        _check_eval_mode(parent, path)
    elif key in ("parameter_name", "buffer_name", "tensor_constant_name") and not (
        isinstance(value, str) and _FQN_RE.fullmatch(value)
    ):
        raise _refuse(path, f"the program names a state entry {str(value)[:80]!r}, which is not a dotted name")


def _check_module_stack(stack: object, path: Path) -> None:
    """``nn_module_stack`` is ``key,path,type`` items joined by ";": unflatten makes each path a submodule."""
    if not isinstance(stack, str):
        raise _refuse(path, "the program has a malformed module stack")
    for item in stack.split(";"):
        parts, depth, start = [], 0, 0
        for end, char in enumerate(item):  # split on commas outside brackets, as torch does
            depth += (char in "[(") - (char in ")]")
            if char == "," and depth == 0:
                parts.append(item[start:end])
                start = end + 1
        parts.append(item[start:])
        if len(parts) != 3 or not _MODULE_FQN_RE.fullmatch(parts[1]):
            raise _refuse(path, f"the program's module stack names {item[:80]!r}, which is not a dotted module name")


def _check_target(target: object, path: Path) -> None:
    """Only aten operators (no file access) and symbolic-size builtins may be called."""
    if not isinstance(target, str):
        raise _refuse(path, "the program has a node without an operator name")
    if target in _BUILTIN_TARGETS:
        return
    match = _ATEN_TARGET_RE.fullmatch(target)
    if match is None:
        raise _refuse(
            path,
            f"the program calls {target[:120]!r}; only torch.ops.aten operators are supported (no custom, "
            "higher-order or Python callables)",
        )
    try:
        overload = getattr(getattr(torch.ops.aten, match.group(1)), match.group(2))
    except (AttributeError, RuntimeError):
        raise _refuse(path, f"the program calls {target!r}, which this torch does not have") from None
    if not isinstance(overload, torch._ops.OpOverload):
        raise _refuse(path, f"the program calls {target!r}, which is not an operator overload")
    if any(arg.name in ("filename", "file", "path") for arg in overload._schema.arguments):
        raise _refuse(path, f"the program calls {target!r}, which reads or writes files")


def _check_eval_mode(node: dict[str, Any], path: Path) -> None:
    for arg in node["inputs"]:
        if isinstance(arg, dict) and arg.get("name") in ("training", "train") and arg.get("arg") == {"as_bool": True}:
            raise _refuse(
                path,
                f"{node['target']} runs in training mode: the model was exported in train mode; "
                "call model.eval() before torch.export.export",
            )


def _check_expr(expr: object, path: Path) -> None:
    """Accept only arithmetic over ``Symbol``/``Integer`` (sympy ``eval``s these strings)."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        raise _refuse(path, "the program has a malformed or oversized symbolic size expression")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _refuse(path, f"the program has an unparsable symbolic size {expr[:80]!r}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > _MAX_EXPR_NODES:
        raise _refuse(path, "the program has an oversized symbolic size expression")
    symbol_names = {
        id(node.args[0])
        for node in nodes
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Symbol" and node.args
    }
    for node in nodes:
        ok: bool
        if isinstance(node, ast.Expression | ast.Load | ast.keyword):
            ok = not isinstance(node, ast.keyword) or (
                node.arg in _SYMBOL_KEYWORDS and isinstance(node.value, ast.Constant) and type(node.value.value) is bool
            )
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
        elif isinstance(node, ast.Name):
            ok = node.id in _SYMPY_CALLS or bool(_SYMBOL_RE.fullmatch(node.id))
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                ok = id(node) in symbol_names and bool(_SYMBOL_RE.fullmatch(value))
            else:
                ok = isinstance(value, int) and abs(value) < (1 << 63)
        elif isinstance(node, ast.BinOp):
            ok = isinstance(node.op, _EXPR_BINOPS)
        elif isinstance(node, ast.UnaryOp):
            ok = isinstance(node.op, _EXPR_UNARYOPS)
        elif isinstance(node, ast.Compare):
            ok = all(isinstance(op, _EXPR_CMPOPS) for op in node.ops)
        elif isinstance(node, ast.BoolOp):
            ok = True
        else:
            ok = isinstance(node, _EXPR_BINOPS + _EXPR_UNARYOPS + _EXPR_CMPOPS + (ast.And, ast.Or))
        if not ok:
            raise _refuse(
                path,
                f"the program has a symbolic size {expr[:120]!r} that is not plain arithmetic (sympy would eval it)",
            )


def _check_treespec(spec: object, path: Path) -> None:
    """Input/output treespecs may hold only tuples, lists, dicts and leaves (others import modules)."""
    try:
        doc = json.loads(spec) if isinstance(spec, str) else None
    except (ValueError, RecursionError):
        doc = None
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == 1):
        raise _refuse(path, "the program has a malformed input/output tree spec")
    stack = [doc[1]]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or node.get("type") not in _TREESPEC_TYPES:
            kind = node.get("type") if isinstance(node, dict) else node
            raise _refuse(path, f"the program's inputs/outputs use container type {str(kind)[:80]!r}, not supported")
        context = node.get("context")
        try:
            ctx = json.loads(context) if isinstance(context, str) else context
        except (ValueError, RecursionError):
            ctx = {}
        # Dict keys double as keyword-argument names in generated code: identifiers or integers only.
        if not (ctx is None or (isinstance(ctx, list) and all(_is_key(k) for k in ctx))):
            raise _refuse(path, "the program's input/output tree spec has keys that are not identifiers")
        children = node.get("children_spec")
        if not isinstance(children, list):
            raise _refuse(path, "the program has a malformed input/output tree spec")
        stack.extend(children)


def _is_key(key: object) -> bool:
    return (isinstance(key, int) and not isinstance(key, bool)) or (
        isinstance(key, str) and bool(_IDENT_RE.fullmatch(key))
    )


def _check_signature(signature: dict[str, Any], path: Path) -> None:
    inputs, outputs = signature.get("input_specs"), signature.get("output_specs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise _refuse(path, "the program's signature is malformed")
    for spec in inputs:
        kind = next(iter(spec), None) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind not in _INPUT_SPECS:
            raise _refuse(path, f"the program has a {kind!r} input; only tensors, parameters and buffers are supported")
    for spec in outputs:
        kind = next(iter(spec), None) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind != "user_output":
            raise _refuse(
                path,
                f"the program has a {kind!r} output (it mutates state: exported in training mode?); "
                "only plain outputs are supported",
            )
    if not outputs:
        raise _refuse(path, "the program has no outputs")


def _image_input_size(program: dict[str, Any], path: Path) -> tuple[int, int]:
    """(H, W) of the one user input, which must be ``[B, 3, H, W]`` with a dynamic, unbounded B."""
    gm = program["graph_module"]
    user = [spec["user_input"] for spec in gm["signature"]["input_specs"] if "user_input" in spec]
    if len(user) != 1:
        raise ModelLoadError(
            f"{path}: the program takes {len(user)} inputs; a dissectable network takes exactly one image "
            "tensor [B, 3, H, W]",
            path=str(path),
        )
    arg = user[0].get("arg") if isinstance(user[0], dict) else None
    name = arg.get("as_tensor", {}).get("name") if isinstance(arg, dict) else None
    meta = gm["graph"].get("tensor_values", {}).get(name) if isinstance(name, str) else None
    sizes = meta.get("sizes") if isinstance(meta, dict) else None
    if not isinstance(sizes, list) or len(sizes) != 4:
        raise ModelLoadError(
            f"{path}: the program's input is not an image batch [B, 3, H, W] (it has shape {_shape_str(sizes)})",
            path=str(path),
        )
    channels, height, width = (s.get("as_int") if isinstance(s, dict) else None for s in sizes[1:])
    if channels != 3 or not isinstance(height, int) or not isinstance(width, int) or height < 1 or width < 1:
        raise ModelLoadError(
            f"{path}: the program's input has shape {_shape_str(sizes)}, not an RGB image batch [B, 3, H, W] "
            "with a fixed height and width",
            path=str(path),
        )
    batch = sizes[0]
    if isinstance(batch, dict) and "as_int" in batch:
        raise ModelLoadError(
            f"{path}: the program was exported with a static batch size of {batch['as_int']}, but the dissection "
            f"engine runs batches of any size: {_DYNAMIC_HINT}",
            path=str(path),
        )
    symbol = _batch_symbol(batch)
    bounds = program.get("range_constraints", {}).get(symbol) if symbol else None
    if isinstance(bounds, dict) and bounds.get("max_val") is not None:
        raise ModelLoadError(
            f"{path}: the program's dynamic batch dimension is capped at {bounds['max_val']}, but the dissection "
            f"engine runs batches of any size: {_DYNAMIC_HINT} (without max=)",
            path=str(path),
        )
    return height, width


def _batch_symbol(size: object) -> str | None:
    expr = size.get("as_expr", {}).get("expr_str") if isinstance(size, dict) else None
    if isinstance(expr, str):
        tree = ast.parse(expr, mode="eval").body  # already checked by _check_expr
        if isinstance(tree, ast.Call) and tree.args and isinstance(tree.args[0], ast.Constant):
            return str(tree.args[0].value)
        if isinstance(tree, ast.Name):
            return tree.id
    return None


def _shape_str(sizes: object) -> str:
    if not isinstance(sizes, list):
        return "unknown"
    dims = [str(s.get("as_int", "B")) if isinstance(s, dict) else "?" for s in sizes]
    return "[" + ", ".join(dims) + "]"


# ----------------------------------------------------------------------------------------------
# Payloads: raw bytes -> tensors, no unpickling


def _read_payloads(
    zf: zipfile.ZipFile,
    archive: _Archive,
    config: Mapping[str, dict[str, Any]],
    prefix: str,
    path: Path,
    *,
    params: bool,
) -> dict[str, torch.Tensor]:
    """Rebuild each payload as a strided view of its file's raw bytes (shared files stay shared)."""
    storages: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.items():
        what = f"{'weight' if params else 'constant'} {fqn!r}"
        dtype, sizes, strides, offset, requires_grad = _tensor_layout(meta["tensor_meta"], what, path)
        name = meta["path_name"]
        flat = storages.get(name)
        if flat is None:
            flat = _read_raw(zf, archive.members[prefix + name], dtype, what, path)
            storages[name] = flat
        if flat.dtype != dtype:
            raise _refuse(path, f"{what} reads {name} as {dtype}, but another entry reads it as {flat.dtype}")
        numel = 1
        for s in sizes:
            numel *= s
        extent = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1 if numel else 0
        if extent > flat.numel():
            raise _refuse(path, f"{what} needs {extent} elements, but {name} holds {flat.numel()}")
        tensor = torch.as_strided(flat, sizes, strides, offset)
        if params and meta["is_param"]:
            tensor = nn.Parameter(tensor, requires_grad=requires_grad)
        out[fqn] = tensor
    return out


def _read_raw(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: torch.dtype, what: str, path: Path) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if info.file_size % itemsize:
        raise _refuse(path, f"{what}: {info.filename} is {info.file_size} bytes, not a whole number of {dtype}")
    buffer = bytearray(info.file_size)
    view = memoryview(buffer)
    got = 0
    try:
        with zf.open(info) as fh:
            reader = cast(io.BufferedIOBase, fh)  # a ZipExtFile
            while got < info.file_size:
                n = reader.readinto(view[got:])
                if not n:
                    break
                got += n
    except Exception as exc:  # BadZipFile (bad CRC), zlib.error, OSError, ...
        raise _refuse(path, f"{what}: {info.filename} is unreadable ({_first_line(exc)})") from None
    if got != info.file_size:
        raise _refuse(path, f"{what}: {info.filename} is truncated")
    if sys.byteorder != "little":  # pragma: no cover - the byteorder member was checked equal to this host's
        raise _refuse(path, "big-endian hosts are not supported")
    raw = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype)
