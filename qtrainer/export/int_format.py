"""The ``int`` export format: a safetensors file with integer weight codes.

Tensors (keys follow the model's state dict):

- ``<layer>.weight.codes``: the integer weight codes of every quantized layer, in the narrowest
  type: weights of at most 4 bits are **bit-packed** into a flat ``uint8`` stream at ``bits``
  bits per code (4-bit: two codes per byte, 2-bit: four; 3-bit: a continuous stream), codes
  stored **offset** (``code - lo``, with ``lo`` the code range minimum, so always unsigned),
  element ``i`` at bit ``i * bits`` counted from the least significant bit of byte 0
  (row-major order of the weight; a final partial byte is zero-padded). 5..8-bit codes are
  ``int8`` (``uint8`` for unsigned ranges), 9..16-bit ``int16`` (``uint16``), shaped like the
  weight, two's complement, zero point 0.
- ``<layer>.weight.scale``: fp32 step size, shape ``[1]`` (per tensor), ``[C]`` (per output
  channel) or ``[R]`` (per group, ``R = C * in / group_size``: the weight's elements in
  row-major order cut into ``R`` groups of ``group_size``, the layer's ``weight.kwargs``
  ``granularity``/``group_size``); the weight is exactly ``codes * scale`` (per group: each
  group's codes times its scale). For NIPQ ``scale = alpha / n``.
- ``<layer>.input.scale``: fp32 step size of the layer's input quantizer (the input codes are
  ``round(clamp(x / scale, lo, hi))`` for LSQ/tempering; NIPQ computes
  ``round(n * clamp(x / alpha, lo/alpha, 1))``, equal up to float rounding).
- Every other entry of the model's state dict as it is: quantizer parameters (LSQ ``step``,
  NIPQ ``theta_a``/``theta_b``/``fixed_bits``), biases, BatchNorm, non-quantized layers.

Metadata key ``qtrainer`` holds a JSON header: ``format`` (``qtrainer-int``), ``version``,
``recipe_hash`` and ``metadata`` (from the ``metadata`` argument), ``sha256`` (of the rest of
the header and all tensor names, dtypes, shapes and bytes; checked on load), ``folded_bn``, and ``layers``: one entry per
quantized layer with ``name``, ``kind``, ``method``, ``position``, ``weight_bits``,
``act_bits``, ``signed_input``, ``weight_shape`` and the full ``weight``/``input`` quantizer
descriptions (bits, signed, code range, storage dtype and packing, constructor arguments).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import torch
from torch import nn

from ..forward import disable_transformer_fast_paths
from ..nn import QUANTIZED_TYPES, QuantizedLayer, quantizable_weight
from ..nn_attention import MATMUL_SITES
from ..surgery import LayerReport, set_quantizers
from ..atomic import write_bytes_atomic
from ..quantizers.formulas import dequantize
from ._common import active, build_quantizer, int_weight, quantized_layers, quantizer_spec

FORMAT_NAME = "qtrainer-int"
FORMAT_VERSION = 1
META_KEY = "qtrainer"
PACK_MAX_BITS = 4
CODES, SCALE, INPUT_SCALE = ".weight.codes", ".weight.scale", ".input.scale"

_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "uint16": torch.uint16,
           "int32": torch.int32}


# -- packing ----------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int, lo: int) -> torch.Tensor:
    """Bit-pack integer ``codes`` (any shape, values in ``lo .. lo + 2^bits - 1``) into a flat
    ``uint8`` tensor: ``code - lo`` at ``bits`` bits per element, LSB first."""
    offset = codes.detach().reshape(-1).to(torch.int64).cpu().numpy() - lo
    if offset.size and (offset.min() < 0 or offset.max() >= 2**bits):
        raise ValueError(f"codes outside {lo}..{lo + 2**bits - 1} cannot be packed at {bits} bits")
    planes = ((offset[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, lo: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a flat int64 tensor of ``numel`` codes."""
    need = math.ceil(numel * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"packed codes: expected {need} uint8 bytes for {numel} {bits}-bit codes, "
                         f"got {tuple(packed.shape)} {packed.dtype}")
    planes = np.unpackbits(packed.numpy(), bitorder="little", count=numel * bits).reshape(numel, bits)
    values = planes.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(values + lo)


def storage_dtype(bits: int, lo: int, hi: int) -> str:
    """``packed`` for <= 4 bits, else the narrowest integer dtype holding ``lo..hi``."""
    if bits <= PACK_MAX_BITS:
        return "packed"
    for name in ("int8", "uint8", "int16", "uint16", "int32"):
        info = torch.iinfo(_DTYPES[name])
        if info.min <= lo and hi <= info.max:
            return name
    raise ValueError(f"code range {lo}..{hi} does not fit int32")  # pragma: no cover


def encode_codes(codes: torch.Tensor, bits: int, lo: int, hi: int) -> tuple[torch.Tensor, str]:
    kind = storage_dtype(bits, lo, hi)
    if kind == "packed":
        return pack_codes(codes, bits, lo), kind
    return codes.detach().cpu().to(torch.int64).to(_DTYPES[kind]).contiguous(), kind


def decode_codes(stored: torch.Tensor, entry: dict, shape: list[int]) -> torch.Tensor:
    """The codes as fp32 (integers) shaped like the weight."""
    numel = math.prod(shape)
    lo, hi = entry["code_range"]
    if entry["storage"] == "packed":
        codes = unpack_codes(stored, entry["bits"], lo, numel)
    else:
        if stored.dtype != _DTYPES[entry["storage"]] or list(stored.shape) != list(shape):
            raise ValueError(f"codes stored as {stored.dtype} {tuple(stored.shape)}, header says "
                             f"{entry['storage']} {tuple(shape)}")
        codes = stored.to(torch.int64).reshape(-1)
    if numel and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes outside the code range {lo}..{hi}")
    return codes.to(torch.float32).reshape(shape)


# -- writing ----------------------------------------------------------------------------------
def _digest(tensors: dict[str, torch.Tensor], header: dict) -> str:
    """sha256 over the header (without its ``sha256`` entry) and every tensor's name, dtype,
    shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fp32_bytes(t: torch.Tensor) -> int:
    return t.numel() * (4 if t.is_floating_point() else t.element_size())


def build_int(model: nn.Module, metadata: dict | None = None,
              folded: list[tuple[str, str]] | None = None) -> tuple[dict, dict, dict]:
    """(tensors, header, categories) of an eval copy ``model`` (hard quantization)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    category: dict[str, str] = {}
    fp32: dict[str, int] = {}
    layers = []
    quant_prefixes = []
    for name, layer in quantized_layers(model):
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        if isinstance(layer, nn.MultiheadAttention) and not layer._qkv_same_embed_dim:
            raise ValueError(f"layer {name!r}: the int format stores the packed in_proj_weight; "
                             "nn.MultiheadAttention with separate q/k/v weights (kdim/vdim) "
                             "exports as onnx, torchscript or exported_program")
        for side in ("weight_quantizer", "input_quantizer", "matmul_quantizers"):
            quant_prefixes.append(f"{name}.{side}.")
        report = getattr(layer, "qreport", None)
        report = report.to_dict() if isinstance(report, LayerReport) else {}
        fp_kind = layer.float_kind
        bias = getattr(layer, layer.BIAS_NAME, None)
        entry = {"name": name, "kind": fp_kind, "method": None, "position": report.get("position", ""),
                 "weight_bits": None, "act_bits": None, "signed_input": None,
                 "weight_shape": list(layer.weight.shape), "weight_dtype": str(layer.weight.dtype).split(".")[-1],
                 "has_bias": bias is not None, "weight": None, "input": None, "report": report,
                 "act_numel": int(getattr(layer, "act_numel", 0)), "macs": int(getattr(layer, "macs", 0))}
        if wq is not None:
            spec = quantizer_spec(wq, "weight")
            entry["method"] = spec["method"]
            if active(wq):
                codes, scale = int_weight(layer)
                lo, hi = spec["code_range"]
                stored, kind = encode_codes(codes, spec["bits"], lo, hi)
                spec.update(storage=kind, per_channel=scale.numel() > 1,
                            scale_count=scale.numel())
                tensors[name + CODES] = stored
                tensors[name + SCALE] = scale.float().cpu().contiguous()
                key = f"layers_{spec['bits']}bit"
                category[name + CODES] = key
                category[name + SCALE] = "quant_params"
                fp32[name + CODES] = layer.weight.numel() * 4
                state.pop(f"{name}.{layer.WEIGHT_NAME}")
                if bias is not None:
                    category[f"{name}.{layer.BIAS_NAME}"] = key
                entry["weight_bits"] = spec["bits"]
            entry["weight"] = spec
        if iq is not None:
            spec = quantizer_spec(iq, "input")
            entry["method"] = entry["method"] or spec["method"]
            if active(iq):
                tensors[name + INPUT_SCALE] = iq.step_size.detach().float().reshape(-1).cpu().clone()
                category[name + INPUT_SCALE] = "quant_params"
                entry["act_bits"], entry["signed_input"] = spec["bits"], spec["signed"]
            entry["input"] = spec
        layers.append(entry)

    bn_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    fp_prefixes = [n + "." for n, m in model.named_modules()
                   if isinstance(m, tuple(QUANTIZED_TYPES)) and not isinstance(m, QuantizedLayer)]
    for key, value in state.items():
        if key in tensors:
            raise ValueError(f"state dict key {key!r} collides with an export key")
        tensors[key] = value.cpu().contiguous()
        if key not in category:
            if any(key.startswith(p) for p in quant_prefixes):
                category[key] = "quant_params"
            elif any(key.startswith(p) for p in bn_prefixes):
                category[key] = "batchnorm"
            elif any(key.startswith(p) for p in fp_prefixes):
                category[key] = "fp_layers"
            elif any(key.startswith(e["name"] + ".") for e in layers):
                category[key] = "quantized_layers_fp"  # bias of a layer whose weight stays FP
            else:
                category[key] = "other"
        fp32[key] = 0 if category[key] == "quant_params" else _fp32_bytes(value)

    meta = dict(metadata or {})
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
              "recipe_hash": meta.get("recipe_hash"), "metadata": meta,
              "torch": torch.__version__, "folded_bn": [list(p) for p in (folded or [])],
              "layers": layers}
    header["sha256"] = _digest(tensors, header)
    sizes = {}
    for key, t in tensors.items():
        c = sizes.setdefault(category[key], {"bytes": 0, "fp32_bytes": 0, "tensors": 0})
        c["bytes"] += t.numel() * t.element_size()
        c["fp32_bytes"] += fp32.get(key, 0)
        c["tensors"] += 1
    return tensors, header, sizes


def save_int(model: nn.Module, path, metadata: dict | None = None,
             folded: list[tuple[str, str]] | None = None) -> dict:
    """Write the int file (atomically); returns the size report."""
    from safetensors.torch import save

    tensors, header, sizes = build_int(model, metadata, folded)
    try:
        text = json.dumps(header, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serializable (strings, numbers, lists, dicts): {e}") from None
    write_bytes_atomic(path, save(tensors, metadata={META_KEY: text, "format": "pt"}))
    file_bytes = os.path.getsize(path)
    tensor_bytes = sum(c["bytes"] for c in sizes.values())
    sizes["header"] = {"bytes": file_bytes - tensor_bytes, "fp32_bytes": 0, "tensors": 0}
    for c in sizes.values():
        c["share"] = c["bytes"] / file_bytes
    fp32_total = sum(c["fp32_bytes"] for c in sizes.values())
    excluded = [k for k in sizes if k == "batchnorm" or (k.startswith("layers_") and int(k[7:-3]) >= 8)]
    kept = [k for k in sizes if k not in excluded]
    num = sum(sizes[k]["bytes"] for k in kept)
    den = sum(sizes[k]["fp32_bytes"] for k in kept)
    return {"file_bytes": file_bytes, "fp32_bytes": fp32_total, "ratio": file_bytes / fp32_total,
            "excluded_share": sum(sizes[k]["share"] for k in excluded),
            "ratio_excluding_bn_8bit": num / den if den else float("nan"),
            "categories": sizes, "layers": len(header["layers"])}


# -- reading ----------------------------------------------------------------------------------
def _bad(path, why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)!r} is not a valid qtrainer int export: {why}")


def read_int(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of an int file, checked: header present and of a known version,
    tensor checksum matches. Damaged files raise ``ValueError`` naming the file."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"int export {path!r} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, OverflowError, ...
        raise _bad(path, f"unreadable safetensors data, truncated or tampered ({type(e).__name__}: {e})") from None
    if META_KEY not in meta:
        raise _bad(path, f"no {META_KEY!r} header in the safetensors metadata")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise _bad(path, f"header format is {header.get('format') if isinstance(header, dict) else header!r}, "
                         f"expected {FORMAT_NAME!r}")
    if not isinstance(header.get("version"), int) or header["version"] > FORMAT_VERSION:
        raise _bad(path, f"format version {header.get('version')!r} is not supported "
                         f"(this qtrainer reads up to {FORMAT_VERSION})")
    for key in ("layers", "sha256", "folded_bn"):
        if key not in header:
            raise _bad(path, f"header has no {key!r}")
    if _digest(tensors, header) != header["sha256"]:
        raise _bad(path, "checksum mismatch of header and tensors (the file was modified or damaged)")
    return tensors, header


def read_header(path) -> dict:
    """The JSON header of an int file (layer table, metadata, format version)."""
    return read_int(path)[1]


def load_int(path, model: nn.Module) -> nn.Module:
    """Rebuild the quantized model from an int file into ``model``, a fresh full-precision model
    of the same architecture (modified in place and returned, in eval mode, hard quantization).

    Weights become exactly ``codes * scale`` and the quantizers get their exported parameters,
    so eval outputs are bit-identical to the exported model's. BatchNorms folded at export
    (``fold_bn=True``) are replaced by ``nn.Identity``. Raises ``ValueError`` for a damaged
    file or a model that does not match the file's layer table.
    """
    tensors, header = read_int(path)
    modules = dict(model.named_modules())
    if any(isinstance(m, QuantizedLayer) for m in modules.values()):
        raise ValueError(f"load_int({os.fspath(path)!r}): the model already holds quantized layers; "
                         "give a fresh full-precision model of the same architecture")
    try:
        plan = []
        for entry in header["layers"]:
            name = entry["name"]
            module = modules.get(name)
            if module is None or type(module).__name__ != entry["kind"] or type(module) not in QUANTIZED_TYPES:
                found = type(module).__name__ if module is not None else "nothing"
                raise ValueError(f"layer {name!r}: the file has a {entry['kind']}, the model has {found}")
            if list(quantizable_weight(module).shape) != entry["weight_shape"]:
                raise ValueError(f"layer {name!r}: weight shape "
                                 f"{list(quantizable_weight(module).shape)} in the model, "
                                 f"{entry['weight_shape']} in the file")
            plan.append((entry, module))
        for _, bn_name in header["folded_bn"]:
            if not isinstance(modules.get(bn_name), nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"folded BatchNorm {bn_name!r} not found in the model")
    except (KeyError, TypeError) as e:
        raise _bad(path, f"malformed layer table ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"load_int({os.fspath(path)!r}): {e}") from None

    state = {k: v for k, v in tensors.items() if not k.endswith((CODES, SCALE, INPUT_SCALE))}
    built = []
    try:  # everything that can fail on file content happens before the model is modified
        for entry, module in plan:
            name, shape = entry["name"], entry["weight_shape"]
            wspec, ispec = entry["weight"], entry["input"]
            wq = build_quantizer(wspec, shape[0], tuple(shape)) if wspec else None
            iq = build_quantizer(ispec, None) if ispec else None
            if wspec and wspec["enabled"]:
                codes = decode_codes(tensors[name + CODES], wspec, shape)
                scale = tensors[name + SCALE].float()
                weight_name = QUANTIZED_TYPES[type(module)].WEIGHT_NAME
                state[f"{name}.{weight_name}"] = dequantize(codes, scale).to(
                    getattr(torch, entry["weight_dtype"]))
            report = LayerReport(**entry["report"]) if entry["report"] else None
            built.append((entry, module, wq, iq, report))
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise _bad(path, f"{type(e).__name__}: {e}") from None
    built_layers = []
    try:
        for entry, module, wq, iq, report in built:
            name = entry["name"]
            if entry["has_bias"] and getattr(module, "bias", False) is None:
                module.bias = nn.Parameter(torch.zeros(entry["weight_shape"][0], dtype=module.weight.dtype,
                                                       device=module.weight.device))
            device = quantizable_weight(module).device
            extra = {}
            if report is not None and report.matmul_bits is not None:
                extra["matmul_quantizers"] = {site: build_quantizer(
                    {"method": report.method, "role": "input", "bits": report.matmul_bits,
                     "signed": site != "probs", "kwargs": report.method_kwargs}, None).to(device)
                    for site in MATMUL_SITES}
            qlayer = QUANTIZED_TYPES[type(module)].from_float(
                module, wq and wq.to(device), iq and iq.to(device), **extra)
            qlayer.act_numel, qlayer.macs = entry["act_numel"], entry["macs"]
            if report is not None:
                qlayer.qreport = report
            built_layers.append((name, qlayer))
        for name, qlayer in sorted(built_layers, key=lambda b: b[0].count(".")):
            parent, _, child = name.rpartition(".")  # outer first: out_proj into its attention
            setattr(model.get_submodule(parent) if parent else model, child, qlayer)
        for _, bn_name in header["folded_bn"]:
            parent, _, child = bn_name.rpartition(".")
            setattr(modules[parent] if parent else model, child, nn.Identity())
        model.load_state_dict(state, strict=True)
        disable_transformer_fast_paths(model)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"load_int({os.fspath(path)!r}): the file does not match the model "
                         f"({type(e).__name__}: {e})") from None
    model.eval()
    set_quantizers(model, hard=True)
    return model
