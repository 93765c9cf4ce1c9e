"""One-shot GPU check: proves the GPU path of the training loop and its distributed hooks, and
measures it, in one command and one JSON file.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a GPU machine, < 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out x.json  # anywhere (the test suite runs it)

It needs PyTorch and numpy, not Ray, MLflow or a network: the loop (`pipeline.core.training`) and the hooks
(`pipeline.core.collectives`) are driven with `torch.distributed` directly, in processes of its own.
Our config needs pydantic; on a machine without it, put its wheels in `.whl/` at the repository root
(`bash benchmarks/gpu_check_wheels.sh` downloads them, about 2 MiB) and they are unpacked to a
temporary folder. The ONNX export parity needs onnx and onnxruntime; without them it is skipped.

Sections, each capped in time (a section out of time stops and says so), all figures to `--out`:
- environment: torch, CUDA, cuDNN, NCCL, the GPU, TF32 settings;
- device_matrix: a few steps of each method (MLP on 2D points, DCGAN with each loss, ADA,
  conditional, EMA, R1, simultaneous updates, bf16, fp16, channels-last, CycleGAN): finite losses,
  every tensor on the device, a checkpoint saved on the device loads on the CPU and back, unchanged;
- distributed: the hooks over NCCL in one process (every collective under NCCL's device rules),
  then two processes (NCCL on two GPUs, or gloo with CUDA tensors when they share one GPU: NCCL
  refuses two ranks on one device): the ranks end bitwise equal, and N workers equal 1 worker
  within `N_EQUALS_1_TOL` (TF32 off);
- determinism: two runs with train.deterministic bitwise equal; a resumed run equals an
  uninterrupted one; the drift of two runs without it;
- throughput: DCGAN 28x28 at batch 64 and 512 in fp32 (deterministic and not), TF32, bf16, fp16
  and channels-last: steps/s, images/s, peak memory, host-device syncs per step (counted with
  `torch.cuda.set_sync_debug_mode`);
- export: a GPU-trained generator exported on the CPU (TorchScript, ONNX) matches its GPU output.
Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_EQUALS_1_TOL = 1e-5  # max |param| difference, 2 workers vs 1, after the distributed section's steps


def _bootstrap_wheels() -> None:
    """Make pydantic importable from wheels carried in `.whl/` when the machine lacks it."""
    sys.path.insert(0, str(ROOT))
    try:
        import pydantic  # noqa: F401

        return
    except ImportError:
        pass
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        sys.exit("gpu_check: pydantic is missing; run `bash benchmarks/gpu_check_wheels.sh` and carry .whl/")
    site = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    sys.path.insert(0, str(site))


_bootstrap_wheels()

import torch  # noqa: E402

from pipeline.core import training  # noqa: E402
from pipeline.core.collectives import Collectives, on_device  # noqa: E402
from pipeline.core.config import Config, build_config, deep_merge, read_yaml  # noqa: E402
from pipeline.io.outputs import load_tensors  # noqa: E402

# ---- configs and data ------------------------------------------------------------------------

IMAGE = {"data": {"name": "digits"}, "model": {"arch": "dcgan", "hidden": 32}}
CASES: dict[str, dict] = {
    "grid_mlp": {},
    **{
        f"dcgan_{loss}": deep_merge(IMAGE, {"loss": {"name": loss}})
        for loss in ("minimax", "nonsaturating", "wgan", "wgan-gp", "lsgan", "hinge")
    },
    "dcgan_r1": deep_merge(IMAGE, {"loss": {"r1_gamma": 1.0}}),
    "dcgan_ada": deep_merge(IMAGE, {"train": {"ada": {"enabled": True, "interval": 2}}}),
    "dcgan_conditional": deep_merge(IMAGE, {"model": {"conditional": True}}),
    "dcgan_ema": deep_merge(IMAGE, {"train": {"ema": 0.99}}),
    "grid_simultaneous": {"train": {"update": "simultaneous"}},
    "dcgan_bf16": deep_merge(IMAGE, {"train": {"precision": "bf16"}}),
    "dcgan_fp16": deep_merge(IMAGE, {"train": {"precision": "fp16"}}),
    "dcgan_channels_last": deep_merge(IMAGE, {"train": {"channels_last": True}}),
    "cyclegan": {
        "data": {"name": "digits", "target": "mnist5k"},
        "model": {"family": "cyclegan", "arch": "dcgan", "hidden": 16},
        "train": {"batch_size": 16},
    },
}


def make_cfg(over: dict, steps: int, batch: int | None = None, deterministic: bool = True) -> Config:
    base = read_yaml(ROOT / "params.yaml")
    run = {
        "train": {
            "steps": steps,
            "log_every": max(1, steps // 2),
            "checkpoint_every": 10**9,
            "deterministic": deterministic,
        },
        "eval": {"every": 0},
    }
    if batch:
        run["train"]["batch_size"] = batch
    return build_config(deep_merge(deep_merge(base, over), run))


def make_data(cfg: Config, size: int, n: int = 512, seed: int = 0):
    """Synthetic training data shaped like the config's dataset: (x, y, classes, x_b)."""
    g = torch.Generator().manual_seed(seed)
    if cfg.model.arch == "mlp":
        return torch.randn(n, 2, generator=g) * 2, None, None, None
    x = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=g)
    x_b = torch.rand(n, 1, size, size, generator=g) * 2 - 1 if cfg.model.family == "cyclegan" else None
    return x, y, 10, x_b


def run_gan(cfg: Config, device, data, shard=None, hooks=None, gan=None, ada_p: float = 0.0, batches=None):
    """Train `gan` (a new one by default) to cfg.train.steps on `device`; `batches` continues the
    staging plan of an earlier call (no directly drawn first step)."""
    x, y, k, x_b = (None if t is None else (training.place_data(t, device) if torch.is_tensor(t) else t) for t in data)
    k = k if cfg.model.conditional else None
    if gan is None:
        gan = training.build_gan(cfg, list(x.shape[1:]), device, k)
        gan.ada_p = ada_p
    batches = batches or training.Batches(
        x,
        cfg.train.batch_size,
        cfg.model.z_dim,
        cfg.seed,
        shard or training.Shard(),
        y,
        k or 0,
        x_b,
        device,
        channels_last=cfg.train.channels_last and x.dim() == 4,
    )
    training.train(gan, cfg, batches, hooks or training.Hooks())
    return gan, batches


def gan_tensors(gan) -> dict[str, torch.Tensor]:
    """Every tensor training keeps (Adam's `step` counters live on the CPU by design)."""
    out = {}
    for name in ("G", "D", "G_ema"):
        m = getattr(gan, name)
        if m is not None:
            out.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    for name in ("opt_g", "opt_d"):
        for i, st in enumerate(getattr(gan, name).state.values()):
            out.update({f"{name}.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v) and k != "step"})
    for k, pool in gan.pools.items():
        if pool.images is not None:
            out[f"pool.{k}"] = pool.images
    return out


def weights(gan) -> list[torch.Tensor]:
    return [p.detach().float().cpu().clone() for p in gan.G.parameters()] + [
        p.detach().float().cpu().clone() for p in gan.D.parameters()
    ]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def finite_losses(gan) -> bool:
    return bool(gan.history) and all(
        math.isfinite(v) for row in gan.history for k, v in row.items() if k.startswith("loss/")
    )


# ---- sections ----------------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def out(self) -> bool:
        return time.perf_counter() > self.end


def environment(args, deadline) -> dict:
    dev = torch.device(args.device)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
        "cpu_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=p.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    return {"ok": True, **env}


def device_matrix(args, deadline) -> dict:
    dev = torch.device(args.device)
    steps, size = (4, 8) if args.quick else (30, 28)
    rows, ok = {}, True
    for name, over in CASES.items():
        if deadline.out():
            rows[name] = {"ok": False, "skipped": "section out of time"}
            ok = False
            continue
        if "fp16" in name and dev.type != "cuda":
            rows[name] = {"ok": True, "skipped": "fp16 needs a GPU"}
            continue
        try:
            cfg = make_cfg(over, steps, batch=16 if args.quick else None)
            training.configure_numerics(True, dev)
            gan, _ = run_gan(cfg, dev, make_data(cfg, size), ada_p=0.5 if cfg.train.ada.enabled else 0.0)
            tensors = gan_tensors(gan)
            off = sorted(k for k, v in tensors.items() if not on_device(v, dev))
            with tempfile.TemporaryDirectory() as d:
                torch.save(training.gan_state(gan), Path(d) / "state.pt")
                state = load_tensors(Path(d) / "state.pt", map_location="cpu")
                on_cpu = all(t.device.type == "cpu" for t in state["G"].values())
                back = training.build_gan(
                    cfg, list(make_data(cfg, size)[0].shape[1:]), dev, 10 if cfg.model.conditional else None
                )
                training.load_gan_state(back, state, cfg)
                roundtrip = bitwise(weights(gan), weights(back)) and not any(
                    not on_device(v, dev) for k, v in gan_tensors(back).items() if k.startswith(("G.", "D."))
                )
            row = {
                "ok": finite_losses(gan) and not off and on_cpu and roundtrip,
                "finite_losses": finite_losses(gan),
                "off_device": off[:5],
                "loads_on_cpu": on_cpu,
                "roundtrip_equal": roundtrip,
                "last": {k: round(v, 5) for k, v in gan.history[-1].items() if k.startswith(("loss/", "D/"))},
            }
        except Exception as e:  # one failing case must not hide the others
            row = {"ok": False, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-3)}
        rows[name] = row
        ok = ok and row["ok"]
    return {"ok": ok, "steps": steps, "cases": rows}


def _dist_worker(rank: int, world: int, port: int, backend: str, device: str, steps: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # all_gather_object moves its bytes through the current device
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        training.configure_numerics(True, dev)
        comm = Collectives(world, dev)
        # NCCL's device rules on every collective kind the workers use
        probe = torch.nn.Linear(3, 2).to(dev)
        for p in probe.parameters():
            p.grad = torch.full_like(p, float(rank + 1))
        comm.sync_grads(probe)
        stats = comm.reduce_stats({"loss/D": float(rank)})
        gathered = comm.gather(rank)
        cfg = make_cfg({}, steps, batch=64)
        hooks = training.Hooks(sync_grads=comm.sync_grads, reduce_stats=comm.reduce_stats)
        gan, _ = run_gan(cfg, dev, make_data(cfg, 0), training.Shard(rank, world), hooks)
        torch.save(
            {
                "weights": weights(gan),
                "grad": float(probe.weight.grad[0, 0]),
                "stats": stats,
                "gathered": gathered,
                "history": gan.history,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _spawn(world: int, backend: str, devices: list[str], steps: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_dist_worker, args=(r, world, port, backend, devices[r], steps, d)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(240)
            if p.is_alive():
                p.kill()
        codes = [p.exitcode for p in procs]
        if any(codes):
            raise RuntimeError(f"{backend} workers exited with {codes}")
        return {r: torch.load(f"{d}/rank{r}.pt") for r in range(world)}


def distributed(args, deadline) -> dict:
    dev = torch.device(args.device)
    steps = 6 if args.quick else 40
    cuda = dev.type == "cuda"
    cfg = make_cfg({}, steps, batch=64)
    training.configure_numerics(True, dev)
    single, _ = run_gan(cfg, dev, make_data(cfg, 0))
    ref = weights(single)
    out = {"steps": steps, "tolerance": N_EQUALS_1_TOL}
    one = _spawn(1, "nccl" if cuda else "gloo", [str(dev)], steps)
    out["one_process"] = {
        "backend": "nccl" if cuda else "gloo",
        "grad_mean": one[0]["grad"],
        "equals_in_process_run": bitwise(one[0]["weights"], ref),
    }
    two_gpus = cuda and torch.cuda.device_count() >= 2
    backend = "nccl" if two_gpus else "gloo"
    devices = ["cuda:0", "cuda:1"] if two_gpus else [str(dev), str(dev)]
    two = _spawn(2, backend, devices, steps)
    diff = max_diff(two[0]["weights"], ref)
    out["two_processes"] = {
        "backend": backend,
        "devices": devices,
        "grad_mean": [two[r]["grad"] for r in (0, 1)],
        "stats_mean": two[0]["stats"],
        "gathered": two[0]["gathered"],
        "ranks_bitwise_equal": bitwise(two[0]["weights"], two[1]["weights"]),
        "max_abs_diff_vs_1_worker": diff,
    }
    out["ok"] = (
        out["one_process"]["equals_in_process_run"]
        and out["one_process"]["grad_mean"] == 1.0
        and out["two_processes"]["ranks_bitwise_equal"]
        and out["two_processes"]["grad_mean"] == [1.5, 1.5]
        and two[0]["stats"] == {"loss/D": 0.5}
        and two[0]["gathered"] == [0, 1]
        and diff <= N_EQUALS_1_TOL
    )
    return out


def determinism(args, deadline) -> dict:
    dev = torch.device(args.device)
    steps, size = (6, 8) if args.quick else (60, 28)
    over = deep_merge(IMAGE, {"train": {"ada": {"enabled": True, "interval": 2}}})

    def once(deterministic: bool, upto: int | None = None, gan=None):
        cfg = make_cfg(over, upto or steps, batch=16 if args.quick else 128, deterministic=deterministic)
        training.configure_numerics(deterministic, dev)
        return run_gan(cfg, dev, make_data(cfg, size), gan=gan, ada_p=0.3)[0]

    a, b = weights(once(True)), weights(once(True))
    half = once(True, steps // 2)
    with tempfile.TemporaryDirectory() as d:
        torch.save(training.gan_state(half), Path(d) / "state.pt")
        cfg = make_cfg(over, steps, batch=16 if args.quick else 128)
        resumed = training.build_gan(cfg, [1, size, size], dev)
        training.load_gan_state(resumed, load_tensors(Path(d) / "state.pt", map_location=dev), cfg)
    resumed = weights(once(True, gan=resumed))
    fast = [weights(once(False)) for _ in range(2)]
    training.configure_numerics(True, dev)
    out = {
        "steps": steps,
        "deterministic_runs_bitwise_equal": bitwise(a, b),
        "resume_equals_uninterrupted": bitwise(a, resumed),
        "nondeterministic_runs_max_abs_diff": max_diff(*fast),
        "deterministic_vs_fast_max_abs_diff": max_diff(a, fast[0]),
    }
    out["ok"] = out["deterministic_runs_bitwise_equal"] and out["resume_equals_uninterrupted"]
    return out


MODES = {  # name: (precision, deterministic, tf32, channels_last)
    "fp32_deterministic": ("fp32", True, False, False),
    "fp32": ("fp32", False, False, False),
    "tf32": ("fp32", False, True, False),
    "bf16": ("bf16", False, True, False),
    "fp16": ("fp16", False, True, False),
    "channels_last_bf16": ("bf16", False, True, True),
}


def throughput(args, deadline) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    batches = (16, 32) if args.quick else (64, 512)
    warm, n = (2, 3) if args.quick else (20, 100)
    rows = {}
    for batch in batches:
        for mode, (precision, det, tf32, cl) in MODES.items():
            key = f"dcgan28_b{batch}_{mode}"
            if deadline.out():
                rows[key] = {"skipped": "section out of time"}
                continue
            if precision == "fp16" and not cuda:
                rows[key] = {"skipped": "fp16 needs a GPU"}
                continue
            over = deep_merge(IMAGE, {"model": {"hidden": 64}, "train": {"precision": precision, "channels_last": cl}})
            cfg = make_cfg(over, warm, batch=batch, deterministic=det)
            training.configure_numerics(det, dev)
            if cuda:
                prec = "tf32" if tf32 else "ieee"
                torch.backends.cuda.matmul.fp32_precision = prec
                torch.backends.cudnn.conv.fp32_precision = prec
                torch.cuda.reset_peak_memory_stats(dev)
            data = make_data(cfg, 8 if args.quick else 28, n=4096)
            gan, staged = run_gan(cfg, dev, data)  # warm-up (cuDNN autotuning, allocator, the draw plan)
            timed = make_cfg(over, warm + n, batch=batch, deterministic=det)
            timed = build_config(deep_merge(timed.to_dict(), {"train": {"log_every": 10**9}}))
            syncs = 0
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.set_sync_debug_mode("warn")
                t0 = time.perf_counter()
                run_gan(timed, dev, data, gan=gan, batches=staged)
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.synchronize(dev)
                dt = time.perf_counter() - t0
                syncs = sum("synchroniz" in str(w.message) for w in caught)
            rows[key] = {
                "steps_per_s": round(n / dt, 2),
                "images_per_s": round(n * batch / dt, 1),
                "peak_memory_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if cuda else None,
                # counted over the timed steps; the last one's log tick reads the losses (one sync)
                "host_syncs_per_step": round(syncs / n, 3) if cuda else None,
            }
    training.configure_numerics(True, dev)
    base = rows.get(f"dcgan28_b{batches[-1]}_fp32_deterministic", {}).get("steps_per_s")
    fast = rows.get(f"dcgan28_b{batches[-1]}_fp32", {}).get("steps_per_s")
    return {
        "ok": True,
        "warmup_steps": warm,
        "timed_steps": n,
        "runs": rows,
        "resnet": "no ResNet GAN yet (issue #14)",
        "deterministic_cost": None if not (base and fast) else round(fast / base, 3),
    }


def export(args, deadline) -> dict:
    dev = torch.device(args.device)
    try:
        from pipeline.io import export as exporter
    except ImportError as e:
        return {"ok": True, "skipped": f"export needs {e.name}"}
    cfg = make_cfg(IMAGE, 6 if args.quick else 50, batch=16 if args.quick else 128)
    training.configure_numerics(True, dev)
    gan, _ = run_gan(cfg, dev, make_data(cfg, 8 if args.quick else 28))
    G_dev = gan.G_ema if gan.G_ema is not None else gan.G
    with tempfile.TemporaryDirectory() as d:
        torch.save({"spec": gan.spec, "state_dict": G_dev.state_dict()}, Path(d) / "generator.pt")
        blob = load_tensors(Path(d) / "generator.pt")  # on the CPU, as the export stage loads it
        from pipeline.core.objectives import build_generator

        G_cpu = build_generator(blob["spec"])
        G_cpu.load_state_dict(blob["state_dict"])
        G_cpu.eval(), G_dev.eval()
        z = torch.randn(64, cfg.model.z_dim, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            gpu_vs_cpu = float((G_dev(z.to(dev)).float().cpu() - G_cpu(z)).abs().max())
        try:
            _, diffs = exporter.export_all(G_cpu, cfg.model.z_dim, ["torchscript", "onnx"], Path(d))
        except ImportError as e:
            return {"ok": True, "gpu_vs_cpu_max_abs_diff": gpu_vs_cpu, "skipped": f"export needs {e.name}"}
    return {
        "ok": gpu_vs_cpu < exporter.PARITY_TOL,
        "gpu_vs_cpu_max_abs_diff": gpu_vs_cpu,
        "exported_vs_torch_max_abs_diff": diffs,
        "tolerance": exporter.PARITY_TOL,
    }


SECTIONS = {  # name: (function, time cap in seconds on a GPU)
    "environment": (environment, 30),
    "device_matrix": (device_matrix, 90),
    "distributed": (distributed, 90),
    "determinism": (determinism, 60),
    "throughput": (throughput, 150),
    "export": (export, 40),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's CPU run)")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report: dict = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name, (fn, cap) in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                result = fn(args, Deadline(cap))
        except Exception as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-4)}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report[name] = result
        print(f"[gpu_check] {name}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))  # what is done so far survives
    report["ok"] = all(report[n].get("ok") for n in SECTIONS if n in report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"[gpu_check] {'all checks passed' if report['ok'] else 'FAILED'}; figures in {args.out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
