"""One prepared GPU check: correctness against CPU float64, step breakdown with AMP, dense InfoNCE, an fp16 run.

Detects the device (``--device auto``: CUDA when available) and runs four parts (``--parts``):

a. **correctness**: every matcher (``coordinate_match``, ``nearest_coordinate_match``,
   ``similarity_match``, ``location_match``, ``correspondence_match``), ``SemanticReweighting``
   and every loss (``DenseInfoNCE`` with a queue and in-batch, ``PixContrastLoss``,
   ``PixProConsistencyLoss``, ``LocalContrastiveLoss``, ``DenseSimSiamLoss``, ``RegionSimLoss``,
   ``BYOLLoss``, ``InfoNCE``, ``NegativeCosine``) in float32 on the device against the same
   inputs in float64 on the CPU: values and gradients (of the loss w.r.t. every float input).
   Float outputs pass when ``max|device - reference| <= tol * max|reference|`` (the error
   relative to the largest reference entry); the tolerance of each row is printed (values and
   gradients 1e-4, geometric points 1e-5; ``--tol-scale`` multiplies them).
   Bool and index outputs must be identical, except the argmax of ``similarity_match``, whose
   indices may differ only at ties: its matched cosine (recomputed in float64) is compared
   instead. TF32 matmuls are switched off for this part. Any FAIL makes the exit status 1.
b. **step breakdown**: ``step_breakdown.py``'s per-method step, ResNet-50 at 224 px, batch 32,
   with bf16 and with fp16 autocast + GradScaler (``--amps``); library share per method.
c. **dense InfoNCE at scale**: ``DenseInfoNCE`` forward + backward at B = 32, 28 x 28, K = 65,536,
   D = 128 against the bare ``q @ Q^T`` + ``logsumexp`` floor (forward, and ``exp(L - lse) @ Q``
   for the query gradient), the two products alone, and the naive ``cat`` + ``cross_entropy``
   (when memory allows); median time and peak memory (``torch.cuda.max_memory_allocated`` above
   the inputs; on the CPU the live tensor bytes of :class:`live_memory.LiveTensorBytes`).
d. **fp16 run**: ``examples/pixcon/train.py`` for 20 steps with ``--amp fp16 --device cuda`` in a
   subprocess; every logged loss must be finite.

On a machine without CUDA everything still runs, in a reduced form with ``--quick`` (small
sizes; part b on the demo configuration at batch 2, part d on the CPU with ``--amp bf16`` and
tiny sizes), each reduction printed with its reason. Everything goes to ``--json``.

Usage::

    python benchmarks/gpu_check.py --json gpu_check.json                # on a GPU machine, < 5 minutes
    python benchmarks/gpu_check.py --quick --json gpu_check_cpu.json    # anywhere, about a minute
    python benchmarks/gpu_check.py --quick --parts a --tol-scale 0      # must FAIL: zero tolerance
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import step_breakdown as sb
import torch
import torch.nn.functional as F
from live_memory import LiveTensorBytes
from losses import floor_fwd_bwd, matmuls_only
from torch import Tensor

from densecontrast.geometry import ViewGeometry
from densecontrast.losses import (
    BYOLLoss,
    DenseInfoNCE,
    DenseSimSiamLoss,
    InfoNCE,
    LocalContrastiveLoss,
    NegativeCosine,
    PixContrastLoss,
    PixProConsistencyLoss,
    RegionSimLoss,
)
from densecontrast.losses.dense_infonce import default_chunk_size
from densecontrast.matching import (
    Matches,
    coordinate_match,
    correspondence_match,
    location_match,
    nearest_coordinate_match,
    similarity_match,
)
from densecontrast.weighting import SemanticReweighting

ROOT = Path(__file__).resolve().parents[1]
TOL_VALUE, TOL_GRAD, TOL_GEOMETRY = 1e-4, 1e-4, 1e-5


# ============================================================================================ part a
@dataclasses.dataclass
class Sizes:
    batch: int
    grid: int
    dim: int
    queue: int


def _geometries(b: int, gen: torch.Generator) -> tuple[ViewGeometry, ViewGeometry]:
    """Two float32 views of 640 x 480 images (random resized crops with flips)."""
    g1, g2 = sb.random_geometries("pixpro", b, (640, 480), gen)
    return g1, g2


def _move_matches(m: Matches, device: torch.device, dtype: torch.dtype) -> Matches:
    fields = {}
    for f in dataclasses.fields(m):
        v = getattr(m, f.name)
        if isinstance(v, Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        fields[f.name] = v
    return Matches(**fields)


def _matches_dict(m: Matches, num_keys: int | None = None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {"valid": m.valid}
    if m.in_box is not None:
        out["in_box"] = m.in_box
    if m.key_mask is not None and num_keys is not None:  # multi-positive: compare the positive sets
        out["positives"] = m.to_dense(num_keys)
    elif m.key_index is not None:
        out["key_index"] = torch.where(m.valid, m.key_index, torch.full_like(m.key_index, -1))
    for name in ("key_points", "query_points", "similarity"):
        v = getattr(m, name)
        if v is not None:
            out[name] = v
    out["weight"] = m.weight
    return out


@dataclasses.dataclass
class Case:
    """One check: ``fn(inputs) -> outputs`` run on CPU float64 (reference) and on the device in float32.

    ``inputs`` maps names to CPU float64 tensors, ViewGeometry or Matches; ``grad`` names the float
    inputs whose gradient of ``outputs["loss"]`` is compared; ``tol`` maps output names to their
    tolerance (float outputs without an entry use ``TOL_VALUE``); ``skip`` names outputs compared
    by another rule (reported, not judged).
    """

    name: str
    fn: Callable[[dict[str, Any]], dict[str, Tensor]]
    inputs: dict[str, Any]
    grad: tuple[str, ...] = ()
    tol: dict[str, float] = dataclasses.field(default_factory=dict)
    skip: tuple[str, ...] = ()


def _to(x: Any, device: torch.device, dtype: torch.dtype, requires_grad: bool) -> Any:
    if isinstance(x, ViewGeometry):
        return x.to(device, dtype)
    if isinstance(x, Matches):
        return _move_matches(x, device, dtype)
    if isinstance(x, Tensor):
        y = x.to(device, dtype) if x.is_floating_point() else x.to(device)
        return y.detach().requires_grad_() if requires_grad else y
    return x


def evaluate(case: Case, device: torch.device, dtype: torch.dtype,
             perturb: float = 0.0) -> dict[str, Tensor]:
    """Run ``case`` on ``device`` in ``dtype``; outputs and gradients, as float64 / bool / long on the CPU."""
    inputs = {k: _to(v, device, dtype, k in case.grad) for k, v in case.inputs.items()}
    if perturb:  # a deliberately wrong input: the first float tensor (+ perturb) or geometry (+ 100 x perturb px)
        name = case.grad[0] if case.grad else next(
            (k for k, v in inputs.items() if isinstance(v, Tensor) and v.is_floating_point()), None)
        if name is not None:
            with torch.no_grad():
                inputs[name] = (inputs[name] + perturb).detach().requires_grad_(name in case.grad)
        else:
            name = next(k for k, v in inputs.items() if isinstance(v, ViewGeometry))
            g = inputs[name]
            inputs[name] = ViewGeometry(g.boxes + 100 * perturb, g.flips, g.image_size)
    outs = case.fn(inputs)
    if case.grad:
        grads = torch.autograd.grad(outs["loss"], [inputs[k] for k in case.grad], allow_unused=True)
        for k, g in zip(case.grad, grads):
            outs[f"grad {k}"] = torch.zeros_like(inputs[k]) if g is None else g
    return {k: (v.detach().cpu().double() if v.is_floating_point() else v.detach().cpu()) for k, v in outs.items()}


def relative_error(dev: Tensor, ref: Tensor) -> float:
    """``max|dev - ref| / max|ref|`` (the absolute error when ``ref`` is all zero or empty)."""
    if ref.numel() == 0:
        return 0.0
    diff = float((dev - ref).abs().max())
    scale = float(ref.abs().max())
    return diff / scale if scale > 0 else diff


def compare(case: Case, ref: dict[str, Tensor], dev: dict[str, Tensor], tol_scale: float = 1.0) -> list[dict[str, Any]]:
    """One row per output: PASS / FAIL, the error and the tolerance used."""
    rows = []
    for key, r in ref.items():
        d = dev[key]
        row: dict[str, Any] = {"case": case.name, "output": key, "shape": list(r.shape)}
        if key in case.skip:
            diff = int((r != d).sum()) if r.shape == d.shape else -1
            row.update(status="info", error=float(diff), tol=None, rule="differences allowed at ties (see matched cos)")
        elif r.shape != d.shape:
            row.update(status="FAIL", error=math.inf, tol=0.0, rule=f"shape {tuple(d.shape)} != {tuple(r.shape)}")
        elif r.is_floating_point():
            tol = tol_scale * case.tol.get(key, TOL_GRAD if key.startswith("grad") else TOL_VALUE)
            finite = bool(torch.isfinite(d).all()) and bool(torch.isfinite(r).all())
            err = relative_error(d, r)
            ok = finite and err <= tol
            row.update(status="PASS" if ok else "FAIL", error=err if finite else math.inf, tol=tol,
                       rule="relative: max abs(dev - ref) / max abs(ref)")
        else:
            diff = int((r != d).sum())
            row.update(status="PASS" if diff == 0 else "FAIL", error=float(diff), tol=0.0, rule="identical")
        rows.append(row)
    return rows


def _cos64(q: Tensor, k: Tensor, index: Tensor) -> Tensor:
    """float64 cosine of each query row with its chosen key row: q (B, N, C), k (B, M, C), index (B, N)."""
    q, k = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    chosen = torch.gather(k, 1, index[..., None].expand(-1, -1, k.shape[-1]))
    return (q * chosen).sum(-1)


def build_cases(s: Sizes, seed: int = 0) -> list[Case]:
    """Every matcher, the reweighting and every loss, on random float64 inputs of sizes ``s``."""
    gen = torch.Generator().manual_seed(seed)
    b, g, d, kq = s.batch, s.grid, s.dim, s.queue
    n = g * g
    shape = (g, g)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    g1, g2 = _geometries(b, gen)
    geo = {"g1": g1.to(torch.float64), "g2": g2.to(torch.float64)}
    queue = F.normalize(randn(kq, d), dim=1)
    coord = coordinate_match(geo["g1"], geo["g2"], shape, shape)
    corr = correspondence_match(geo["g1"], geo["g2"], shape, shape)
    single = Matches(valid=torch.rand(b, n, generator=gen) < 0.9, weight=torch.rand(b, n, generator=gen,
                     dtype=torch.float64), key_index=torch.randint(0, n, (b, n), generator=gen), key_shape=shape)
    fq, fk = randn(b, 32, g, g), randn(b, 32, g, g)
    sim_m = similarity_match(fq, fk, query_geometry=geo["g1"], key_geometry=geo["g2"], query_shape=shape,
                             key_shape=shape)

    def sim_fn(x: dict[str, Any]) -> dict[str, Tensor]:
        m = similarity_match(x["fq"], x["fk"], query_geometry=x["g1"], key_geometry=x["g2"], query_shape=shape,
                             key_shape=shape)
        out = _matches_dict(m)
        out["matched cos (float64)"] = _cos64(x["fq"].flatten(2).transpose(1, 2), x["fk"].flatten(2).transpose(1, 2),
                                              m.key_index)
        return out

    def reweight_fn(x: dict[str, Any]) -> dict[str, Tensor]:
        m = SemanticReweighting(gamma=2.0)(x["m"], x["g1"], x["g2"], shape)
        return {"weight": m.weight, "in_box": m.in_box}

    cases = [
        Case("coordinate_match", lambda x: _matches_dict(coordinate_match(x["g1"], x["g2"], shape, shape), n),
             dict(geo), tol={"weight": TOL_GEOMETRY}),
        Case("nearest_coordinate_match",
             lambda x: _matches_dict(nearest_coordinate_match(x["g1"], x["g2"], shape, shape)), dict(geo)),
        Case("similarity_match", sim_fn, {**geo, "fq": fq, "fk": fk}, skip=("key_index",)),
        Case("location_match", lambda x: _matches_dict(location_match(x["g1"], x["g2"], 49, "grid", shape, shape)),
             dict(geo), tol={"query_points": TOL_GEOMETRY, "key_points": TOL_GEOMETRY}),
        Case("correspondence_match", lambda x: _matches_dict(correspondence_match(x["g1"], x["g2"], shape, shape)),
             dict(geo), tol={"key_points": TOL_GEOMETRY}),
        Case("SemanticReweighting", reweight_fn, {**geo, "m": sim_m}),
        Case("DenseInfoNCE (queue)",
             lambda x: {"loss": DenseInfoNCE(0.2)(x["q"], x["k"], x["m"], x["queue"])},
             {"q": randn(b, d, g, g), "k": randn(b, d, g, g), "m": single, "queue": queue}, grad=("q", "k")),
        Case("DenseInfoNCE (in-batch)", lambda x: {"loss": DenseInfoNCE(0.2)(x["q"], x["k"], x["m"])},
             {"q": randn(b, d, g, g), "k": randn(b, d, g, g), "m": single}, grad=("q", "k")),
        Case("PixContrastLoss", lambda x: {"loss": PixContrastLoss(0.3)(x["q"], x["k"], x["m"])},
             {"q": randn(b, d, g, g), "k": randn(b, d, g, g), "m": coord}, grad=("q", "k")),
        Case("PixProConsistencyLoss", lambda x: {"loss": PixProConsistencyLoss()(x["y"], x["x"], x["m"])},
             {"y": randn(b, d, g, g), "x": randn(b, d, g, g), "m": coord}, grad=("y",)),
        Case("LocalContrastiveLoss", lambda x: {"loss": LocalContrastiveLoss(0.1)(x["q"], x["k"], x["m"])},
             {"q": randn(b, d, g, g), "k": randn(b, d, g, g), "m": corr}, grad=("q", "k")),
        Case("DenseSimSiamLoss", lambda x: {"loss": DenseSimSiamLoss()(x["p1"], x["z2"], x["p2"], x["z1"], x["v"])},
             {"p1": randn(b, 49, d), "z2": randn(b, 49, d), "p2": randn(b, 49, d), "z1": randn(b, 49, d),
              "v": torch.rand(b, 49, generator=gen) < 0.8}, grad=("p1", "p2")),
        Case("RegionSimLoss", lambda x: {"loss": RegionSimLoss(0.1)(x["p1"], x["z2"], x["p2"], x["z1"])},
             {"p1": randn(b, 8, d), "z2": randn(b, 8, d), "p2": randn(b, 8, d), "z1": randn(b, 8, d)},
             grad=("p1", "z2", "p2", "z1")),
        Case("BYOLLoss", lambda x: {"loss": BYOLLoss()(x["p"], x["z"])}, {"p": randn(b, d), "z": randn(b, d)},
             grad=("p",)),
        Case("InfoNCE", lambda x: {"loss": InfoNCE(0.2)(x["q"], x["k"], x["queue"])},
             {"q": randn(b, d), "k": randn(b, d), "queue": queue}, grad=("q", "k")),
        Case("NegativeCosine", lambda x: {"loss": NegativeCosine()(x["p"], x["z"])},
             {"p": randn(b, d), "z": randn(b, d)}, grad=("p",)),
    ]
    return cases


def run_correctness(device: torch.device, sizes: Sizes, tol_scale: float = 1.0, perturb: Sequence[str] = (),
                    seed: int = 0) -> list[dict[str, Any]]:
    """Part a: every case on the device (float32) against the CPU (float64); one row per output."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows: list[dict[str, Any]] = []
    try:
        for case in build_cases(sizes, seed):
            t0 = time.perf_counter()
            try:
                ref = evaluate(case, torch.device("cpu"), torch.float64)
                dev = evaluate(case, device, torch.float32, perturb=1e-2 if case.name in perturb else 0.0)
                case_rows = compare(case, ref, dev, tol_scale)
            except Exception as err:  # a crash on the device is a failure of the check, not of the script
                case_rows = [{"case": case.name, "output": "-", "shape": [], "status": "FAIL", "error": math.inf,
                              "tol": None, "rule": f"raised {type(err).__name__}: {err}"}]
            for r in case_rows:
                r["seconds"] = time.perf_counter() - t0
            rows += case_rows
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


def correctness_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| check | output | shape | error | tolerance | rule | result |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        relative = r["rule"].startswith("relative")
        err = f"{r['error']:.1e}" if relative else (f"{r['error']:g} differ" if r["error"] is not None else "-")
        tol = "-" if r["tol"] is None else f"{r['tol']:g}"
        lines.append(f"| {r['case']} | {r['output']} | {tuple(r['shape'])} | {err} | {tol} | {r['rule']} | "
                     f"{r['status']} |")
    return "\n".join(lines)


# ============================================================================================ part b
def run_step_breakdown(device: torch.device, quick: bool, amps: Sequence[str], methods: Sequence[str],
                       steps: int, warmup: int) -> tuple[list[dict[str, Any]], str | None]:
    """Part b: ``step_breakdown.measure`` for every method and AMP dtype (ResNet-50, 224 px, batch 32)."""
    config, overrides, note = "r50", {}, None
    if quick:
        config, overrides = "demo", {"batch_size": 2, "crop_size": 32}
        note = ("--quick: the demo configuration (tiny backbone) at batch 2 and 32 px instead of ResNet-50 at 224 "
                "px; no peak-memory step")
    results = []
    for amp in amps:
        for method in methods:
            r = sb.measure(method, config, device, amp, steps=steps, warmup=warmup, memory=not quick, **overrides)
            results.append(r)
            print(f"  {r['label']} {amp}: step {r['step_ms']:,.1f} ms, library {100 * r['library_fraction']:.1f} %",
                  flush=True)
    return results, note


# ============================================================================================ part c
def naive(q: Tensor, k: Tensor, queue: Tensor, tau: float) -> Tensor:
    """``cat([l_pos, q @ Q^T]) / tau`` + ``cross_entropy`` (what DenseCL / PixCon do), on ``q``'s device."""
    l_pos = (q * k).sum(1, keepdim=True)
    logits = torch.cat([l_pos, q @ queue.t()], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        sb.sync(device)
        t0 = time.perf_counter()
        fn()
        sb.sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak(fn: Callable[[], object], device: torch.device, inputs: Sequence[Tensor]) -> int:
    gc.collect()
    if device.type == "cuda":
        sb.sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sb.sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensorBytes(*inputs) as mode:
        fn()
    gc.collect()
    return mode.peak


def run_infonce(device: torch.device, batch: int, grid: int, queue_size: int, dim: int, repeats: int,
                naive_limit: float) -> list[dict[str, Any]]:
    """Part c: DenseInfoNCE forward + backward against the floor, the two products and the naive path."""
    gen = torch.Generator().manual_seed(0)
    p = batch * grid * grid
    q = F.normalize(torch.randn(p, dim, generator=gen), dim=1).to(device)
    k = F.normalize(torch.randn(p, dim, generator=gen), dim=1).to(device)
    queue = F.normalize(torch.randn(queue_size, dim, generator=gen), dim=1).to(device)
    qmap = q.reshape(batch, grid * grid, dim)
    kmap = k.reshape(batch, grid * grid, dim)
    m = Matches(valid=torch.ones(batch, grid * grid, dtype=torch.bool, device=device),
                weight=torch.ones(batch, grid * grid, device=device),
                key_index=torch.arange(grid * grid, device=device).expand(batch, -1).contiguous(),
                key_shape=(grid, grid))
    loss_fn = DenseInfoNCE(temperature=0.2)
    chunk = default_chunk_size(queue_size)

    def ours() -> None:
        qq = qmap.detach().requires_grad_()
        loss_fn(qq, kmap, m, queue).backward()

    def floor_full() -> None:  # the bare floor, one (P, K) matrix
        logits = q @ queue.t()
        lse = torch.logsumexp(logits, dim=1)
        (logits - lse[:, None]).exp_() @ queue

    def floor_chunked() -> None:
        floor_fwd_bwd(q, queue, chunk)

    def products() -> None:
        matmuls_only(q, queue, chunk)

    def naive_path() -> None:
        qq = q.detach().requires_grad_()
        naive(qq, k, queue, 0.2).backward()

    full_bytes = p * queue_size * 4
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30
    impls: list[tuple[str, Callable[[], None]]] = [("ours (DenseInfoNCE)", ours)]
    if 2.5 * full_bytes < free:
        impls.append(("floor: q @ Q^T, logsumexp, exp(L - lse) @ Q (one matrix)", floor_full))
    impls.append((f"floor in {chunk}-row chunks", floor_chunked))
    impls.append(("the two products only", products))
    if 4 * full_bytes < min(free, naive_limit * 2**30):
        impls.append(("naive: cat + cross_entropy", naive_path))
    rows = []
    for name, fn in impls:
        fn()  # warm-up
        t = _timed(fn, device, repeats)
        peak = _peak(fn, device, [q, k, queue, qmap, kmap])
        rows.append({"impl": name, "seconds": t, "peak_bytes": peak, "queries": p, "queue": queue_size, "dim": dim,
                     "batch": batch, "grid": grid})
        print(f"  {name}: {1e3 * t:,.1f} ms, peak {peak / 2**20:,.1f} MiB", flush=True)
    ref = next((r for r in rows if r["impl"].startswith("floor")), None)
    for r in rows:
        r["time_over_floor"] = r["seconds"] / ref["seconds"] if ref else None
    if device.type == "cuda":  # agreement of ours with the naive value at this size (float32, on the device)
        a = loss_fn(qmap, kmap, m, queue)
        b = naive(q, k, queue, 0.2) if any(r["impl"].startswith("naive") for r in rows) else None
        if b is not None:
            rows.append({"impl": "value check ours vs naive", "seconds": None, "peak_bytes": None,
                         "abs_diff": float((a - b).abs())})
    return rows


# ============================================================================================ part d
def run_example(device: torch.device, quick: bool, steps: int, timeout: float) -> dict[str, Any]:
    """Part d: ``examples/pixcon/train.py`` for ``steps`` steps with fp16 on CUDA; every logged loss finite."""
    script = ROOT / "examples" / "pixcon" / "train.py"
    if device.type == "cuda":
        extra, note = ["--amp", "fp16", "--device", str(device), "--workers", "4"], None
    else:
        steps = min(steps, 3)
        extra = ["--amp", "bf16", "--device", "cpu", "--workers", "0", "--num-images", "16", "--image-size", "48",
                 "--crop-size", "32", "--batch-size", "4", "--queue-size", "64"]
        note = f"no CUDA: ran on the CPU with --amp bf16, tiny sizes and {steps} steps instead of fp16 on cuda"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(script), "--max-steps", str(steps), "--output-dir", tmp, "--no-eval",
               "--print-freq", "1", "--save-every", "0", *extra]
        env = {**os.environ, "MPLBACKEND": "Agg"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
            rc, out = proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]
        except subprocess.TimeoutExpired as err:
            rc, out = -1, f"timed out after {timeout} s: {err}"
        wall = time.perf_counter() - t0
        metrics = Path(tmp) / "metrics.jsonl"
        losses = []
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if "loss" in rec:
                    losses.append(float(rec["loss"]))
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    ok = rc == 0 and finite and len(losses) == steps
    return {"command": " ".join(cmd[1:]).replace(tmp, "TMP"), "returncode": rc, "seconds": wall, "losses": losses,
            "finite": finite, "status": "PASS" if ok else "FAIL", "note": note, "output_tail": out if not ok else ""}


# ============================================================================================ main
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (the CPU form)")
    p.add_argument("--parts", nargs="+", choices=["a", "b", "c", "d"], default=["a", "b", "c", "d"])
    p.add_argument("--amps", nargs="+", choices=["none", "bf16", "fp16"], default=["bf16", "fp16"])
    p.add_argument("--methods", nargs="+", choices=list(sb.METHODS), default=list(sb.METHODS))
    p.add_argument("--steps", type=int, default=None, help="part b: timed steps (default 10; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="part b: warm-up steps (default 3; 0 with --quick)")
    p.add_argument("--tol-scale", type=float, default=1.0, help="part a: multiply every tolerance (0: must fail)")
    p.add_argument("--perturb", nargs="*", default=[],
                   help="part a: add 1e-2 to one device input of these checks (their rows must FAIL)")
    p.add_argument("--naive-limit-gib", type=float, default=40.0, help="part c: run the naive path below this")
    p.add_argument("--example-steps", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    t_start = time.perf_counter()
    device = sb.resolve_device(args.device)
    cuda = device.type == "cuda"
    env = sb.environment(device)
    env.update(quick=args.quick, cuda_available=torch.cuda.is_available())
    print(f"device: {env['device']}, torch {env['torch']}{', CUDA ' + str(env['cuda']) if cuda else ''}"
          f"{', quick' if args.quick else ''}", flush=True)
    if not cuda:
        print("no CUDA device: running on the CPU (part a compares CPU float32 with CPU float64)", flush=True)
    report: dict[str, Any] = {"environment": env, "argv": list(sys.argv if argv is None else argv)}
    failed = False

    part_seconds: dict[str, float] = {}
    report["part_seconds"] = part_seconds
    t_part = time.perf_counter()

    def part_done(name: str) -> None:
        nonlocal t_part
        part_seconds[name] = time.perf_counter() - t_part
        t_part = time.perf_counter()

    if "a" in args.parts:
        sizes = Sizes(batch=4, grid=7, dim=32, queue=512) if args.quick else Sizes(batch=16, grid=14, dim=128,
                                                                                   queue=4096)
        print(f"\n(a) correctness, float32 on {device} vs float64 on the CPU: B={sizes.batch}, "
              f"{sizes.grid}x{sizes.grid}, D={sizes.dim}, K={sizes.queue}", flush=True)
        rows = run_correctness(device, sizes, args.tol_scale, args.perturb)
        print(correctness_table(rows))
        n_fail = sum(r["status"] == "FAIL" for r in rows)
        print(f"correctness: {'ALL PASS' if n_fail == 0 else f'{n_fail} FAIL'} "
              f"({sum(r['status'] == 'PASS' for r in rows)} PASS)", flush=True)
        failed |= n_fail > 0
        report["correctness"] = {"sizes": dataclasses.asdict(sizes), "tol_scale": args.tol_scale,
                                 "perturb": args.perturb, "rows": rows, "failures": n_fail}
        part_done("a")

    if "b" in args.parts:
        steps = args.steps if args.steps is not None else (1 if args.quick else 10)
        warmup = args.warmup if args.warmup is not None else (0 if args.quick else 3)
        print(f"\n(b) step breakdown, amp {', '.join(args.amps)}", flush=True)
        if not cuda and not args.quick:
            print("  note: ResNet-50 at 224 px on the CPU takes minutes per method and AMP dtype", flush=True)
        results, note = run_step_breakdown(device, args.quick, args.amps, args.methods, steps, warmup)
        if note:
            print(f"  {note}")
        print(sb.table(results))
        report["step_breakdown"] = {"note": note, "results": results}
        part_done("b")

    if "c" in args.parts:
        if args.quick:
            shape = dict(batch=2, grid=7, queue_size=4096, dim=128)
            note = "--quick: B=2, 7x7, K=4,096 instead of B=32, 28x28, K=65,536"
        else:
            shape, note = dict(batch=32, grid=28, queue_size=65536, dim=128), None
        print(f"\n(c) DenseInfoNCE forward + backward: B={shape['batch']}, {shape['grid']}x{shape['grid']}, "
              f"K={shape['queue_size']:,}, D={shape['dim']}" + (f" ({note})" if note else ""), flush=True)
        rows_c = run_infonce(device, repeats=2 if args.quick else 5, naive_limit=args.naive_limit_gib, **shape)
        print("| implementation | time fwd+bwd ms | time / floor | peak MiB |")
        print("|---|---|---|---|")
        for r in rows_c:
            if r["seconds"] is None:
                print(f"| {r['impl']} | abs difference {r['abs_diff']:.2e} | | |")
                continue
            ratio = f"{r['time_over_floor']:.2f}" if r["time_over_floor"] else "-"
            print(f"| {r['impl']} | {1e3 * r['seconds']:,.1f} | {ratio} | {r['peak_bytes'] / 2**20:,.1f} |")
        report["dense_infonce"] = {"note": note, "shape": shape, "rows": rows_c}
        part_done("c")

    if "d" in args.parts:
        print(f"\n(d) examples/pixcon/train.py, {args.example_steps} steps, --amp fp16 on cuda", flush=True)
        res = run_example(device, args.quick, args.example_steps, timeout=240 if cuda else 300)
        if res["note"]:
            print(f"  {res['note']}")
        print(f"  {res['command']}\n  exit {res['returncode']}, {len(res['losses'])} logged losses, "
              f"all finite: {res['finite']}, {res['seconds']:.0f} s: {res['status']}")
        if res["losses"]:
            print(f"  losses: {', '.join(f'{x:.3f}' for x in res['losses'])}")
        if res["status"] == "FAIL":
            print(res["output_tail"])
        failed |= res["status"] == "FAIL"
        report["example"] = res
        part_done("d")

    report["seconds"] = time.perf_counter() - t_start
    report["status"] = "FAIL" if failed else "PASS"
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in part_seconds.items())
    print(f"\ngpu_check: {report['status']} in {report['seconds']:.0f} s ({parts}) on {env['device']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
