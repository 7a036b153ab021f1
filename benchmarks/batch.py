"""Benchmark of the batched path (hcc.batch): prints three tables in one run.

1. Instance-steps per second on rps (eg, exact-natgrad): batched for K = 1, 64, 1024 vs a
   Python loop of hcc.solve over instances. The loop is timed on a few instances and
   extrapolated per instance-step (its cost is linear in K); both time the step loop only
   (V every step, full metrics only at the ends), not building the games.
2. cg-natgrad on the gan game: time per step and peak memory (peak RSS, VmHWM, of a
   fresh subprocess per width, reset before the steps) against the number of parameters, up to ≥ 1M; CG is capped at
   ``--cg-maxiter`` iterations per solve (stated in the table).
3. Peers on rps, seed 0: iterations and wall-clock to V ≤ 1e-6 for exact-natgrad vs plain
   PyTorch Adam-GDA (torch.optim.Adam, maximize=True for the max player) and CGDs' ACGD
   (if installed), as ratios to exact-natgrad; each peer at the best step size of a small grid.

Run: ``python benchmarks/batch.py`` (``--quick`` for a smoke run). Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import hcc
from hcc.batch import solve_batch
from hcc.metrics import lyapunov


def _games(K: int, **opts: object) -> list[hcc.Game]:
    return [hcc.make_game("rps", dict(opts), seed=s).double() for s in range(K)]


#: time exactly the steps asked for: no tolerance stop and no stall stop (V freezes at round-off)
NEVER_STOP = {"tol": 1e-300, "guard": {"stall_window": 0}}


def throughput(solver: str, Ks: list[int], loop_n: int, loop_steps: int) -> list[str]:
    """Rows: K, batched instance-steps/s, loop instance-steps/s (extrapolated), speed-up."""
    g = hcc.make_game("rps", seed=0).double()
    hcc.solve(g, hcc.make_solver(solver, g), steps=3, **NEVER_STOP)  # warm-up
    loop_t = 0.0
    for s in range(loop_n):
        g = hcc.make_game("rps", seed=s).double()
        res = hcc.solve(g, hcc.make_solver(solver, g), steps=loop_steps, log_every=loop_steps, seed=s, **NEVER_STOP)
        loop_t += res.wall_time_s
    loop_rate = loop_n * loop_steps / loop_t
    rows = []
    for K in Ks:
        games = _games(K)
        sv = hcc.make_solver(solver, games[0])
        solve_batch(games, sv, steps=2, **NEVER_STOP)  # warm-up (vmap's first trace)
        steps = 40 if K == 1 else 20 if K <= 64 else 8
        rec = solve_batch(games, sv, steps=steps, **NEVER_STOP)[0]
        rate = K * steps / rec.wall_time_s
        rows.append(f"| rps | {solver} | {K} | {rate:,.0f} | {loop_rate:,.0f} | {K / loop_rate:.2f} s "
                    f"| {rate / loop_rate:.1f}x |")
    return rows


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> int:
    """Current RSS (KiB), after resetting the peak-RSS mark to it (Linux ``clear_refs``; else ru_maxrss).

    ``ru_maxrss`` survives ``exec`` (a child inherits the parent's high-water mark), so the
    per-process ``VmHWM`` of ``/proc/self/status`` is read instead."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak() -> int:
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _gan_one(width: int, cg_maxiter: int, steps: int) -> dict[str, float]:
    """One width in this (fresh) process: time per cg-natgrad step and peak RSS."""
    torch.set_num_threads(1)
    game = hcc.make_game("gan", {"width": width}, seed=0).double()
    solver = hcc.make_solver("cg-natgrad", game, options={"maxiter": cg_maxiter})
    params = game.init_params()
    gen = torch.Generator().manual_seed(0)
    state = solver.init(game, params)
    base = _reset_peak()
    params, state, info = solver.step(game, params, state, game.sample_batch(gen))  # warm-up
    t0 = time.perf_counter()
    iters = 0
    for _ in range(steps):
        params, state, info = solver.step(game, params, state, game.sample_batch(gen))
        iters += int(info["cg_iters_total"])
    dt = (time.perf_counter() - t0) / steps
    peak = _peak()
    d = game.describe()
    return {"width": width, "params": d["params_min"] + d["params_max"], "s_per_step": dt,
            "cg_iters_per_step": iters / steps, "peak_mib": peak / 1024, "step_mib": (peak - base) / 1024}


def gan_memory(widths: list[int], cg_maxiter: int, steps: int) -> list[str]:
    rows = []
    for w in widths:
        out = subprocess.run([sys.executable, __file__, "--gan-one", str(w), "--cg-maxiter", str(cg_maxiter),
                              "--gan-steps", str(steps)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {r['width']} | {r['params']:,} | {r['s_per_step'] * 1e3:,.0f} | {r['cg_iters_per_step']:.0f} "
                    f"| {r['peak_mib']:,.0f} | {r['step_mib']:,.0f} |")
    return rows


# -- peers ------------------------------------------------------------------------------------------


def _peer_run(make_opt, cap: int, seed: int = 0) -> tuple[int | None, float]:
    """Iterations and wall-clock to V ≤ 1e-6 of a torch-optimizer-style peer on rps (autograd, no hcc solver)."""
    game = hcc.make_game("rps", seed=seed).double()
    batch = game.sample_batch()
    th = list(game.min_map.parameters())
    ph = list(game.max_map.parameters())
    params = (dict(game.min_map.named_parameters()), dict(game.max_map.named_parameters()))
    step = make_opt(game, th, ph, params, batch)
    t0 = time.perf_counter()
    for t in range(1, cap + 1):
        step()
        if lyapunov(game, params, batch) <= 1e-6:
            return t, time.perf_counter() - t0
        if not all(bool(torch.isfinite(p).all()) for p in th + ph):
            return None, time.perf_counter() - t0
    return None, time.perf_counter() - t0


def _adam(lr: float):
    def make(game, th, ph, params, batch):
        opt_min = torch.optim.Adam(th, lr=lr)
        opt_max = torch.optim.Adam(ph, lr=lr, maximize=True)

        def step():
            opt_min.zero_grad(), opt_max.zero_grad()
            game.payoff_of(params, batch).backward()
            opt_min.step(), opt_max.step()

        return step

    return make


def _acgd(lr: float):
    from CGDs import ACGD

    def make(game, th, ph, params, batch):
        opt = ACGD(max_params=ph, min_params=th, lr_max=lr, lr_min=lr)

        def step():
            opt.zero_grad()
            opt.step(game.payoff_of(params, batch))

        return step

    return make


def peers(cap: int) -> list[str]:
    g = hcc.make_game("rps", seed=0).double()
    ref = hcc.solve(g, hcc.make_solver("exact-natgrad", g), steps=500, tol=1e-6, log_every=500)
    it0, t0 = ref.steps_to_tol, ref.wall_time_s
    rows = [f"| exact-natgrad (hcc, eg + exact, h = 0.4) | {it0} | {t0:.3f} | 1 | 1 |"]
    cands: list[tuple[str, object, list[float]]] = [("Adam-GDA (torch.optim.Adam, maximize)", _adam,
                                                    [0.003, 0.01, 0.03])]
    try:
        import CGDs  # noqa: F401

        cands.append(("ACGD (CGDs 0.4.5)", _acgd, [0.01, 0.1]))
    except ImportError:
        rows.append("| ACGD (CGDs) | not installed | | | |")
    for name, factory, lrs in cands:
        best = None
        for lr in lrs:
            it, wall = _peer_run(factory(lr), cap)  # type: ignore[operator]
            key = (it is None, it or 0, wall)
            if best is None or key < best[0]:
                best = (key, lr, it, wall)
        _, lr, it, wall = best  # type: ignore[misc]
        if it is None:
            rows.append(f"| {name}, best of h ∈ {lrs} | > {cap} (not reached) | > {wall:.2f} | > {cap / it0:.0f} "
                        f"| > {wall / t0:.0f} |")
        else:
            rows.append(f"| {name}, h = {lr} | {it} | {wall:.3f} | {it / it0:.1f} | {wall / t0:.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--gan-one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gan-steps", type=int, default=2, help="timed cg-natgrad steps per gan width")
    ap.add_argument("--cg-maxiter", type=int, default=10, help="CG iteration cap per solve on the gan")
    ap.add_argument("--peer-cap", type=int, default=2000, help="iteration cap of the peers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.gan_one is not None:
        print(json.dumps(_gan_one(args.gan_one, args.cg_maxiter, args.gan_steps)))
        return
    Ks = [1, 64] if args.quick else [1, 64, 1024]
    print(f"hcc {hcc.__version__}, torch {torch.__version__}, 1 thread, float64, CPU "
          f"(shared with other jobs: timings are noisy)\n")
    print("## 1. batched vs Python loop (instance-steps per second; loop extrapolated per instance-step)\n")
    print("| game | solver | K | batched inst-steps/s | loop inst-steps/s | loop time per K-step | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for solver, n, st in (("eg", 4, 50), ("exact-natgrad", 4, 30)):
        for row in throughput(solver, Ks, n if not args.quick else 2, st if not args.quick else 10):
            print(row, flush=True)
    widths = [32, 128] if args.quick else [32, 128, 256, 512, 720]
    print(f"\n## 2. cg-natgrad on gan: one step (eg: 2 natural directions, 2 players), CG ≤ {args.cg_maxiter} "
          f"iterations per solve, batch 256\n")
    print("| width | parameters | ms / step | CG iterations / step | peak RSS (MiB) | peak growth in steps (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in gan_memory(widths, args.cg_maxiter, args.gan_steps):
        print(row, flush=True)
    print(f"\n## 3. peers on rps (seed 0): iterations and wall-clock to V ≤ 1e-6 (cap {args.peer_cap})\n")
    print("| method | iterations | wall-clock (s) | iterations ratio | wall-clock ratio |")
    print("|---|---|---|---|---|")
    for row in peers(200 if args.quick else args.peer_cap):
        print(row, flush=True)


if __name__ == "__main__":
    main()
