"""Receptive fields of the queries of multi-scale deformable attention: the effective receptive
field (ERF) of an object query or an encoder token, and the gradient weight of each of its
sampling points in every attention layer ("like conv units", DCNv2 §2.1).

Responses (:data:`DECODER_RESPONSE`, :data:`ENCODER_RESPONSE`):

* decoder: r = the object query's class logit of its top class (the argmax over classes of the
  model's ``logits`` / ``pred_logits`` output, batch element 0, before the sigmoid);
* encoder: r = the sum over channels of the token's output embedding of the last encoder
  layer's attention: the output of the last encoder attention call's attention module at the
  token (``[B, tokens, C]`` or ``[tokens, B, C]``, the first tensor of a tuple; Deformable-DETR
  and transformers: the output projection, before the residual, the norm and the FFN; mmcv: with
  its residual), else, when that output is not one embedding per token, its parent module's
  (the encoder layer's). Not the encoder layer's own output: a post-norm layer ends in a
  LayerNorm, whose channel sum ``sum(gamma * x_hat + beta)`` is constant when ``gamma`` is
  uniform (no gradient at all at initialisation).

ERF: ``sum_colour |dr/dI|`` per 8-bit level of each original-image pixel, through the real
forward (:func:`~dcn_inspect.analysis.receptive_field.erf.effective_receptive_field`).

Point gradients: during the one forward with gradients every attention core receives
``sampling_locations + delta`` with ``delta`` a zero leaf that requires grad (the capture's
gradient mode, :mod:`dcn_inspect.capture.attention_calls`), so ``dr/d delta`` is the total
derivative of r with respect to each location (everything downstream follows) while the graph
through the locations to the image stays whole (the ERF is the true input gradient). A location
``loc_x`` is the point ``x_in = offset + stride * (loc_x * W_l - 0.5)`` of the model input
(level l's frame) and ``x = sx * x_in`` of the original image, so
``dr/dx = dr/dloc_x / (stride_x * W_l * sx)`` (y alike, with ``H_l`` and ``sy``), response
units per original-image pixel; the gradient weight is ``|dr/dp| = hypot(dr/dx, dr/dy)``. The
nearest-cell method (RT-DETRv2 ``discrete``) has no gradient with respect to the location (0).

Do the points with large attention weights carry the gradient? Per query and layer: the Spearman
rank correlation between the points' attention weights and their gradient weights
(:func:`spearman`), and the share of the layer's total gradient weight carried by the quarter of
the points with the largest attention weights (:func:`top_quarter_share`; 0.25 would be no
preference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from dcn_inspect.analysis.attention import ATTENTION_CSV, DecoderPredictions, attention_rows
from dcn_inspect.analysis.receptive_field.erf import (
    ErfNumbers,
    effective_receptive_field,
    erf_numbers,
)
from dcn_inspect.capture.attention_calls import (
    DECODER,
    ENCODER,
    AttentionRecord,
    capture_attention,
    is_attention_module,
)
from dcn_inspect.capture.session import capture_offsets, forward
from dcn_inspect.core.columns import Column
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import Pair

__all__ = [
    "DECODER_RESPONSE",
    "ENCODER_RESPONSE",
    "POINT_GRADIENT",
    "QUERY_FIELD_CSV",
    "AttentionGradients",
    "QueryFields",
    "attention_gradient_forward",
    "field_rows",
    "query_fields",
    "query_responses",
    "spearman",
    "top_quarter_share",
]

DECODER_RESPONSE = (
    "r = the object query's class logit of its top class (argmax over classes of the model's "
    "logits / pred_logits output, batch element 0, before the sigmoid)"
)
ENCODER_RESPONSE = (
    "r = sum over channels of the token's output of the last encoder attention module (its "
    "output projection at the token, the first tensor of a tuple; the module is named beside "
    "this definition), or of its parent (the encoder layer) when the attention module's "
    "output is not one embedding per token"
)
POINT_GRADIENT = (
    "dr/dp = total derivative of r with respect to the point's sampling location, per "
    "original-image pixel: dr/dx = dr/dloc_x / (stride_x * W_l * sx), dr/dy = dr/dloc_y / "
    "(stride_y * H_l * sy) (loc: the op's normalised location on level l of W_l x H_l cells, "
    "stride: the level's model-input stride, sx, sy: original / resized image size); "
    "grad_weight = |dr/dp|; ERF = sum over colour channels of |dr/dI| per 8-bit intensity "
    "level of each original-image pixel"
)

#: Columns of ``<stem>_query_receptive_field.csv``: the attention CSV's, then the gradients.
QUERY_FIELD_CSV: Tuple[Column, ...] = (
    *ATTENTION_CSV,
    Column("grad_x", "dr/dx of the point's position (see summary.json response)", "r / pixel"),
    Column("grad_y", "dr/dy of the point's position", "r / pixel"),
    Column("grad_weight", "gradient weight |dr/dp| = hypot(grad_x, grad_y)", "r / pixel"),
    Column(
        "weight_grad_spearman",
        "Spearman rank correlation of weight and grad_weight over the query's points in this "
        "layer (all heads)",
        "-1..1",
    ),
)


@dataclass
class AttentionGradients:
    """One forward with gradients: the model input (a leaf), the output, the attention calls
    and, per call, the zero leaf added to its locations; the outputs of the attention modules
    and their parents (by module name, the last call's)."""

    inputs: torch.Tensor
    output: Any
    records: Dict[str, AttentionRecord]
    deltas: Dict[str, torch.Tensor]
    module_outputs: Dict[str, Any] = field(default_factory=dict)
    conv_layers: int = 0  # deformable conv layers the forward ran


def attention_gradient_forward(
    model: nn.Module, tensor: torch.Tensor, model_name: Optional[str] = None
) -> AttentionGradients:
    """Run ``model`` on ``tensor`` [1, 3, H, W] with gradients, every attention core's
    locations offset by a zero leaf (the module docstring); no attention: ``records`` empty."""
    inputs = tensor.detach().clone().requires_grad_(True)
    deltas: List[torch.Tensor] = []

    def leaf(locations: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(locations, requires_grad=True)
        deltas.append(delta)
        return locations + delta

    watched = _watched_modules(model)
    outputs: Dict[str, Any] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, _n=name: outputs.__setitem__(_n, out))
        for name, module in watched.items()
    ]
    records: Dict[str, AttentionRecord] = {}
    try:
        with torch.enable_grad(), capture_offsets(model, keep_tokens=lambda s, f: []) as capture:
            tracker = capture.tracker
            with capture_attention(
                model,
                records,
                tracker.frame_of_size if tracker is not None else lambda hw: None,
                lambda: capture.input_hw,
                location_leaf=leaf,
            ):
                capture.watch_input(inputs)
                output = forward(model, inputs, model_name)
    finally:
        for handle in handles:
            handle.remove()
    return AttentionGradients(
        inputs, output, records, dict(zip(records, deltas)), outputs, len(capture.convs)
    )


def _watched_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The attention modules and their parents, by name."""
    modules = dict(model.named_modules())
    watched = {}
    for name, module in modules.items():
        if name and is_attention_module(module):
            watched[name] = module
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent in modules:
                watched[parent] = modules[parent]
    return watched


def _logits(output: Any) -> Optional[torch.Tensor]:
    for name in ("logits", "pred_logits"):
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            return value
    return None


def _token_embeddings(output: Any, tokens: int) -> Optional[torch.Tensor]:
    """``[tokens, C]`` of batch element 0 from a module output ``[B, tokens, C]`` or
    ``[tokens, B, C]`` (the first tensor of a tuple); None when not so shaped."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 3:
        return None
    if output.shape[1] == tokens:
        return output[0]
    if output.shape[0] == tokens:
        return output[:, 0]
    return None


def _encoder_embeddings(forward_: AttentionGradients, model_name: str) -> Tuple[torch.Tensor, str]:
    """The last encoder attention's token outputs [tokens, C] and the module they come from."""
    last = [r for r in forward_.records.values() if r.kind == ENCODER][-1]
    module = last.name.split("#")[0]
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    tokens = last.query_count
    for name in (module, parent):
        if name in forward_.module_outputs:
            found = _token_embeddings(forward_.module_outputs[name], tokens)
            if found is not None:
                return found, name
    raise InputError(
        f"{model_name}: cannot read the token outputs of the last encoder attention "
        f"({module} and its parent give no [batch, {tokens}, channels] output)",
        param="model",
    )


def query_responses(
    forward_: AttentionGradients, kind: str, queries: Sequence[int], model_name: str
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The responses r [N] of ``queries`` (in the autograd graph) and their definition."""
    if kind == DECODER:
        logits = _logits(forward_.output)
        if logits is None:
            raise InputError(
                f"{model_name}: the model's output carries no class logits (a logits or "
                "pred_logits field) to take a decoder query's response from",
                param="model",
            )
        index = torch.as_tensor(list(queries), dtype=torch.long, device=logits.device)
        chosen = logits[0, index]
        classes = chosen.detach().argmax(dim=-1)
        responses = chosen.gather(1, classes[:, None])[:, 0]
        return responses, {"definition": DECODER_RESPONSE, "classes": classes.tolist()}
    embeddings, source = _encoder_embeddings(forward_, model_name)
    index = torch.as_tensor(list(queries), dtype=torch.long, device=embeddings.device)
    return embeddings[index].sum(dim=-1), {"definition": ENCODER_RESPONSE, "module": source}


@dataclass
class QueryFields:
    """ERFs and point gradients of the chosen queries (original-image pixels)."""

    kind: str
    queries: List[int]
    responses: np.ndarray  # [N] r
    erf: torch.Tensor  # [N, H, W]
    numbers: List[ErfNumbers]
    layers: List[str]  # the chosen attention calls, in call order
    grad_x: Dict[str, torch.Tensor]  # layer -> [N, heads, P] dr/dx per original-image pixel
    grad_y: Dict[str, torch.Tensor]

    def grad_weight(self, layer: str) -> torch.Tensor:
        return torch.hypot(self.grad_x[layer], self.grad_y[layer])


def _pixel_gradients(
    record: AttentionRecord, delta_grad: torch.Tensor, query: int, scale: Tuple[float, float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """dr/dx, dr/dy [heads, P] per original-image pixel of ``query``'s points, from dr/dloc."""
    grad = delta_grad.detach().double().cpu()
    n, q, heads = grad.shape[:3]
    grad = grad.reshape(n, q, heads, -1, 2)[0, query]  # [heads, P, 2]
    levels = record.point_level
    per_x = torch.tensor(
        [record.level_frames[lv].stride_x * record.spatial_shapes[lv][1] for lv in levels],
        dtype=torch.float64,
    )
    per_y = torch.tensor(
        [record.level_frames[lv].stride_y * record.spatial_shapes[lv][0] for lv in levels],
        dtype=torch.float64,
    )
    return grad[..., 0] / (per_x * scale[0]), grad[..., 1] / (per_y * scale[1])


def query_fields(
    forward_: AttentionGradients,
    responses: torch.Tensor,
    kind: str,
    queries: Sequence[int],
    records: Sequence[AttentionRecord],
    hw: Tuple[Pair, Pair],
    std: Sequence[float],
    scale_to_original: Tuple[float, float],
    boxes: Optional[np.ndarray] = None,
) -> QueryFields:
    """ERF and point gradients (in ``records``, the layers shown) of each query; ``hw``: the
    original image's size and the resized image's inside the model input; ``boxes`` [N, 4]
    (x0, y0, x1, y1, original pixels; a decoder query's own box) for the ERF's mass in box."""
    original_hw, content_hw = hw
    names = [r.name for r in records]
    deltas = [forward_.deltas[name] for name in names]
    erf = torch.zeros((len(queries),) + tuple(original_hw), dtype=torch.float32)
    grad_x: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
    grad_y: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
    numbers = []
    for i, query in enumerate(queries):
        grads = torch.autograd.grad(
            responses[i], [forward_.inputs, *deltas], retain_graph=True, allow_unused=True
        )
        input_grad = grads[0] if grads[0] is not None else torch.zeros_like(forward_.inputs)
        content = input_grad[0, :, : content_hw[0], : content_hw[1]].detach().float().cpu()
        erf[i] = effective_receptive_field(content, original_hw, std)
        box = None if boxes is None else boxes[i]
        numbers.append(erf_numbers(erf[i].numpy(), box))
        for record, delta, grad in zip(records, deltas, grads[1:]):
            gx, gy = _pixel_gradients(
                record,
                torch.zeros_like(delta) if grad is None else grad,
                int(query),
                scale_to_original,
            )
            grad_x[record.name].append(gx)
            grad_y[record.name].append(gy)
    return QueryFields(
        kind,
        [int(q) for q in queries],
        responses.detach().double().cpu().numpy(),
        erf,
        numbers,
        names,
        {name: torch.stack(parts) for name, parts in grad_x.items()},
        {name: torch.stack(parts) for name, parts in grad_y.items()},
    )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either is constant."""
    ra = pd.Series(np.asarray(a, dtype=np.float64)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=np.float64)).rank().to_numpy()
    if len(ra) < 2 or np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_quarter_share(weights: np.ndarray, grad_weights: np.ndarray) -> float:
    """Share of the total gradient weight carried by the quarter of the points (rounded up)
    with the largest attention weights (ties: the lower index first); NaN without gradient."""
    weights = np.asarray(weights, dtype=np.float64)
    grad_weights = np.asarray(grad_weights, dtype=np.float64)
    total = float(grad_weights.sum())
    if not total > 0:
        return float("nan")
    top = np.argsort(-weights, kind="stable")[: max(1, math.ceil(len(weights) / 4))]
    return float(grad_weights[top].sum() / total)


def field_rows(
    fields: QueryFields,
    records: Sequence[AttentionRecord],
    scale_to_original: Tuple[float, float],
    predictions: Optional[DecoderPredictions] = None,
) -> Tuple[pd.DataFrame, List[Dict[str, Any]]]:
    """One row per sampling point (:data:`QUERY_FIELD_CSV`, query-major) and, per query and
    layer, the correlation numbers (query, layer, spearman, top_quarter_share)."""
    frames, stats = [], []
    for i, query in enumerate(fields.queries):
        for record in records:
            rows = attention_rows(record, [query], scale_to_original, predictions)
            gx = fields.grad_x[record.name][i].reshape(-1).numpy()
            gy = fields.grad_y[record.name][i].reshape(-1).numpy()
            weight = np.hypot(gx, gy)
            rho = spearman(rows["weight"].to_numpy(), weight)
            share = top_quarter_share(rows["weight"].to_numpy(), weight)
            frames.append(
                rows.assign(grad_x=gx, grad_y=gy, grad_weight=weight, weight_grad_spearman=rho)
            )
            stats.append(
                {"query": query, "layer": record.name, "spearman": rho, "top_quarter_share": share}
            )
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table, stats
