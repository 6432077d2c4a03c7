"""The attention routes of models/attend.py on CPU, per shape: the numbers `cpu_route` is chosen from.

    .venv/bin/python bench/bench_attention.py [--rounds 7] [--batch 16] [--no-grad]   (sampling: --batch 4)

For each (heads, queries N, keys L, head_dim d) of the `small` UNet (latents 16×16: 256 and 64 positions,
a 77-token prompt, the 16-token middle block) and each dtype: forward + backward (`--no-grad`: forward
only) of the explicit route (baddbmm → softmax → bmm) and of torch's flash kernel (for bf16 with
gradients: in fp32, as `attend` runs it), on q/k/v laid out as the UNet hands them over (views of
(B, N, h·d) projections). Arms interleaved per round in one process, one torch thread; reported: the
median process CPU time per call, and the route `cpu_route` picks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

from latentforge.models import attend as A  # noqa: E402

SHAPES = ((4, 256, 256, 16), (4, 256, 77, 16), (4, 64, 64, 32), (4, 64, 77, 32), (4, 16, 16, 64), (4, 16, 77, 64))


def _inputs(batch: int, h: int, N: int, L: int, d: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    proj = [torch.randn(batch, n, h * d, generator=g).to(dtype).requires_grad_(grad) for n in (N, L, L)]
    return [u.unflatten(-1, (h, -1)).transpose(1, 2) for u in proj]  # (B, h, ·, d) views, as in the UNet


def _arms(batch: int, shape: tuple, dtype: torch.dtype, grad: bool) -> dict:
    def call(route):
        q, k, v = _inputs(batch, *shape, dtype, grad)
        if route == "flash" and grad and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        fn = A._explicit if route == "explicit" else A._cpu_flash
        out = fn(q, k, v, None).to(dtype)
        if grad:
            out.backward(torch.ones_like(out))
    return {route: (lambda r=route: call(r)) for route in ("explicit", "flash")}


def run(rounds: int = 7, batch: int = 16, grad: bool = True) -> list:
    rows = []
    with torch.set_grad_enabled(grad):
        for shape in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                arms = _arms(batch, shape, dtype, grad)
                times = {k: [] for k in arms}
                for f in arms.values():
                    f()
                for _ in range(rounds):
                    for k, f in arms.items():
                        c0 = time.process_time()
                        f()
                        times[k].append(time.process_time() - c0)
                q, k, _ = _inputs(batch, *shape, dtype, False)
                rows.append({"shape": shape, "dtype": str(dtype).replace("torch.", ""),
                             "ms": {r: 1e3 * statistics.median(t) for r, t in times.items()},
                             "picked": A.cpu_route(q, k, upcast=False)})  # under this grad mode
    return rows


def markdown(rows: list, batch: int, grad: bool) -> str:
    body = [[" × ".join(str(x) for x in r["shape"]), r["dtype"], f"{r['ms']['explicit']:.1f}",
             f"{r['ms']['flash']:.1f}", r["picked"]] for r in rows]
    what = "forward + backward" if grad else "forward"
    return common.table(["heads × queries × keys × head_dim", "dtype", f"explicit ms ({what}, B={batch})",
                         f"flash ms ({what}, B={batch})", "cpu_route picks"], body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-grad", action="store_true", help="forward only (sampling)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(markdown(run(args.rounds, args.batch, not args.no_grad), args.batch, not args.no_grad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
