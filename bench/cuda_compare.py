"""dcn-inspect's CUDA deform_conv2d against torchvision.ops.deform_conv2d: speed and agreement.

Shapes (PAPER.md §3 setting and a mid-size one):
  S1: N=1, C=512 -> 512, 38x63, 3x3, pad 2, dilation 2 (res5 at stride 16 on a ~600x1000 image)
  S2: N=8, C=64 -> 64, 56x56, 3x3, pad 1 (many small channels: the gather and scatter dominate)
  S3: N=2, C=256 -> 256, 64x64, 3x3, pad 1

For each shape and variant (v1: no mask; v2: modulated) it times the forward and the
forward + backward (median of --reps timed runs after --warmup, CUDA events), and prints the
max abs differences of the output and of every gradient (input, offset, mask, weight, bias)
against torchvision on the same inputs.

    python bench/cuda_compare.py                    # float32, the three shapes, v1 and v2
    python bench/cuda_compare.py --dtype float16 --reps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {
    "S1": dict(batch=1, cin=512, cout=512, hw=(38, 63), kernel=3, padding=2, dilation=2),
    "S2": dict(batch=8, cin=64, cout=64, hw=(56, 56), kernel=3, padding=1, dilation=1),
    "S3": dict(batch=2, cin=256, cout=256, hw=(64, 64), kernel=3, padding=1, dilation=1),
}
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def make_inputs(
    shape: dict, dtype: torch.dtype, use_mask: bool, seed: int = 0
) -> Dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k, pad, dil = shape["kernel"], shape["padding"], shape["dilation"]
    h, w = shape["hw"]
    out_h = h + 2 * pad - dil * (k - 1)
    out_w = w + 2 * pad - dil * (k - 1)
    kw = dict(generator=gen, device="cuda", dtype=torch.float32)
    fan_in = shape["cin"] * k * k
    inputs = dict(
        input=torch.randn(shape["batch"], shape["cin"], h, w, **kw),
        offset=torch.randn(shape["batch"], 2 * k * k, out_h, out_w, **kw) * 2.0,
        weight=torch.randn(shape["cout"], shape["cin"], k, k, **kw) / fan_in**0.5,
        bias=torch.randn(shape["cout"], **kw),
        mask=torch.sigmoid(torch.randn(shape["batch"], k * k, out_h, out_w, **kw))
        if use_mask
        else None,
    )
    return {name: (t.to(dtype) if t is not None else None) for name, t in inputs.items()}


def cuda_time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ms(value: Optional[float]) -> str:
    return f"{value:>7.3f}ms" if value is not None else f"{'n/a':>9}"


def ratio(a: float, b: Optional[float]) -> str:
    return f"{a / b:>6.2f}" if b else f"{'n/a':>6}"


def run_case(
    name: str, shape: dict, dtype: torch.dtype, use_mask: bool, ours, theirs, warmup: int, reps: int
) -> dict:
    base = make_inputs(shape, dtype, use_mask)
    pad, dil = shape["padding"], shape["dilation"]

    def call(fn, t):
        return fn(
            t["input"],
            t["offset"],
            t["weight"],
            t["bias"],
            (1, 1),
            (pad, pad),
            (dil, dil),
            t["mask"],
        )

    def leaves() -> Dict[str, Optional[torch.Tensor]]:
        return {
            k: (v.detach().clone().requires_grad_(True) if v is not None else None)
            for k, v in base.items()
        }

    out_shape = call(ours, base).shape
    grad_out = torch.randn(
        out_shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda"
    ).to(dtype)

    def fwd(fn) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return call(fn, base)

        return run

    def fwd_bwd(fn) -> Callable[[], object]:
        t = leaves()
        params = [v for v in t.values() if v is not None]

        def run() -> object:
            for p in params:
                p.grad = None
            out = call(fn, t)
            out.backward(grad_out)
            return out

        return run

    row = dict(
        case=name, dtype=str(dtype).replace("torch.", ""), variant="v2 (mask)" if use_mask else "v1"
    )
    try:
        fwd(theirs)()
        tv_supported = True
    except (NotImplementedError, RuntimeError) as exc:  # torchvision has no bfloat16 kernels
        tv_supported = False
        row["torchvision_error"] = str(exc).splitlines()[0]
    row["ours_fwd_ms"] = cuda_time_ms(fwd(ours), warmup, reps)
    row["tv_fwd_ms"] = cuda_time_ms(fwd(theirs), warmup, reps) if tv_supported else None
    row["ours_fwdbwd_ms"] = cuda_time_ms(fwd_bwd(ours), warmup, reps)
    row["tv_fwdbwd_ms"] = cuda_time_ms(fwd_bwd(theirs), warmup, reps) if tv_supported else None

    # Agreement: output and every gradient on identical inputs.
    results = []
    for fn in (ours, theirs) if tv_supported else (ours,):
        t = leaves()
        out = call(fn, t)
        out.backward(grad_out)
        results.append((out.detach(), {k: v.grad for k, v in t.items() if v is not None}))
    if tv_supported:
        (out_a, grads_a), (out_b, grads_b) = results
        diffs = {"output": float((out_a.double() - out_b.double()).abs().max())}
        scale = {"output": float(out_b.double().abs().max())}
        for k in grads_a:
            diffs[k] = float((grads_a[k].double() - grads_b[k].double()).abs().max())
            scale[k] = float(grads_b[k].double().abs().max())
        row["max_abs_diff"] = diffs
        row["max_abs_torchvision"] = scale
    if dtype != torch.float64:
        # Which side is closer to the exact result: torchvision in float64 on the same
        # (already rounded) inputs as the ground truth.
        t = {
            k: (v.detach().double().requires_grad_(True) if v is not None else None)
            for k, v in base.items()
        }
        out_x = call(theirs, t)
        out_x.backward(grad_out.double())
        exact = {"output": out_x.detach(), **{k: v.grad for k, v in t.items() if v is not None}}
        for label, (out, grads) in zip(("ours_vs_f64", "tv_vs_f64"), results):
            got = {"output": out, **grads}
            row[label] = {k: float((got[k].double() - exact[k]).abs().max()) for k in exact}
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", choices=["v1", "v2"], default=["v1", "v2"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--reps", type=int, default=15, help="timed runs per measurement (median; at least 5)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows to this JSON file"
    )
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be at least 5")
    if not torch.cuda.is_available():
        print("cuda_compare: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    try:
        import torchvision.ops as tv_ops
    except Exception as exc:  # noqa: BLE001
        print(f"cuda_compare: torchvision is not importable ({exc})", file=sys.stderr)
        return 2

    from dcn_inspect.ops import _native

    ours_module = _native.load()
    details = _native.build_details()
    if not details.get("with_cuda"):
        print(
            "cuda_compare: the native extension was built without its CUDA kernels", file=sys.stderr
        )
        return 2

    def ours(input, offset, weight, bias, stride, padding, dilation, mask):
        return ours_module.deform_conv2d(
            input, offset, weight, bias, stride, padding, dilation, mask
        )

    def theirs(input, offset, weight, bias, stride, padding, dilation, mask):
        return tv_ops.deform_conv2d(
            input,
            offset,
            weight,
            bias,
            stride=stride,
            padding=padding,
            dilation=dilation,
            mask=mask,
        )

    dtype = DTYPES[args.dtype]
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  "
        f"median of {args.reps} after {args.warmup} warm-up runs"
    )
    header = (
        f"{'case':<4} {'variant':<10} {'fwd ours':>9} {'fwd tv':>9} {'ratio':>6} "
        f"{'f+b ours':>9} {'f+b tv':>9} {'ratio':>6}"
    )
    print(header)
    rows = []
    for name in args.shapes:
        for variant in args.variants:
            row = run_case(
                name, SHAPES[name], dtype, variant == "v2", ours, theirs, args.warmup, args.reps
            )
            rows.append(row)
            print(
                f"{name:<4} {row['variant']:<10} {ms(row['ours_fwd_ms'])} {ms(row['tv_fwd_ms'])} "
                f"{ratio(row['ours_fwd_ms'], row['tv_fwd_ms'])} {ms(row['ours_fwdbwd_ms'])} "
                f"{ms(row['tv_fwdbwd_ms'])} {ratio(row['ours_fwdbwd_ms'], row['tv_fwdbwd_ms'])}"
            )
            if "torchvision_error" in row:
                print(f"     torchvision: {row['torchvision_error']}")
            if "max_abs_diff" in row:
                diffs = "  ".join(
                    f"{k}={v:.2e} (|tv|max {row['max_abs_torchvision'][k]:.2e})"
                    for k, v in row["max_abs_diff"].items()
                )
                print(f"     max |ours - torchvision|: {diffs}")
            for label, title in (("ours_vs_f64", "ours"), ("tv_vs_f64", "torchvision")):
                if label in row:
                    text = "  ".join(f"{k}={v:.2e}" for k, v in row[label].items())
                    print(f"     max |{title} - float64 torchvision|: {text}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows),
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
