"""The multi-GPU path's rules, proven on CPU: collectives on the worker's device, GPUs never asked
for beyond what exists, refusals that only GPUs need, staged draws equal to direct ones, data kept
off the GPU when large, tracking stores every node reaches."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.core import training
from pipeline.core.collectives import Collectives
from pipeline.core.config import ConfigError, build_config, check_on_gpu, deep_merge, read_yaml
from pipeline.core.draws import StepDraws, step_generator
from pipeline.ray.distributed import plan_gpu, tracking_placement_problem

META = torch.device("meta")  # a device that is not the CPU, available on every machine


class DeviceRules:
    """torch.distributed as NCCL sees it: every tensor of a collective must be on `device`."""

    def __init__(self, device: torch.device):
        self.device, self.seen = device, []

    def all_reduce(self, t: torch.Tensor) -> None:
        self.seen.append(t.device)
        assert t.device == self.device, f"collective on {t.device}, the process group runs on {self.device}"

    def all_gather_object(self, out: list, value) -> None:
        out[:] = [value] * len(out)


def _model(device) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(device)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    return m


def test_every_collective_tensor_is_built_on_the_workers_device():
    rules = DeviceRules(META)
    comm = Collectives(2, META, dist=rules)
    model = _model(META)
    comm.sync_grads(model)
    comm.average_buffers(model)
    comm.mean_values([1.0, 2.0])  # the logged stats and ADA's r_t: built on the device, not the host
    assert comm.gather({"a": 1}) == [{"a": 1}, {"a": 1}]
    assert len(rules.seen) == 3 and set(rules.seen) == {META}


def test_a_host_tensor_handed_to_a_device_group_is_refused_with_its_device():
    comm = Collectives(2, META, dist=DeviceRules(META))
    with pytest.raises(RuntimeError, match="collective on a cpu tensor; this worker's collectives run on meta"):
        comm.mean_in_place([torch.ones(3)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comm = Collectives(world, "cpu")
        model = _model("cpu")
        for p in model.parameters():
            p.grad.fill_(float(rank + 1))
        model[1].running_mean.fill_(float(10 * rank))
        comm.sync_grads(model)
        comm.average_buffers(model)
        stats = comm.reduce_stats({"loss/D": float(rank), "loss/G": 2.0 * rank})
        grads = sorted({float(p.grad.flatten()[0]) for p in model.parameters()})
        out.put((rank, grads, float(model[1].running_mean[0]), stats, comm.gather(rank * 7)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_agree_on_the_means_of_grads_buffers_and_stats():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert [r[0] for r in results] == [0, 1]
    for _, grads, running_mean, stats, gathered in results:
        assert grads == [1.5]  # (1 + 2) / 2
        assert running_mean == 5.0
        assert stats == {"loss/D": 0.5, "loss/G": 1.0}
        assert gathered == [0, 7]


@pytest.mark.parametrize("gpus", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("setting", ["auto", True, False])
def test_use_gpu_never_asks_for_more_gpus_than_the_cluster_has(setting, workers, gpus):
    if setting is True and gpus < workers:
        with pytest.raises(
            ValueError, match=f"train.use_gpu: true needs one GPU per worker: train.num_workers is {workers}"
        ):
            plan_gpu(setting, workers, gpus)
        return
    use, note = plan_gpu(setting, workers, gpus)
    assert not use or gpus >= workers  # Ray would wait for ever for GPUs that do not exist
    assert use == (setting is not False and gpus >= workers)
    assert (note is not None) == (setting == "auto" and 0 < gpus < workers)


def _cfg(**train_and_model):
    base = read_yaml("params.yaml")
    return deep_merge(base, train_and_model)


def test_syncbatchnorm_with_r1_on_gpu_workers_is_refused_naming_the_key():
    bad = _cfg(
        data={"name": "digits"},
        model={"arch": "dcgan", "d_norm": "batch"},
        loss={"r1_gamma": 1.0},
        train={"num_workers": 2, "use_gpu": True},
    )
    with pytest.raises(ConfigError, match="model.d_norm: batch norm on 2\\+ GPU workers becomes SyncBatchNorm"):
        build_config(bad)
    for fine in ({"num_workers": 1}, {"use_gpu": False}, {"use_gpu": "auto"}):
        build_config(deep_merge(bad, {"train": fine}))
    build_config(deep_merge(bad, {"loss": {"r1_gamma": 0.0}}))
    # auto resolved to GPUs: the same refusal, at fit time
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        check_on_gpu(build_config(deep_merge(bad, {"train": {"use_gpu": "auto"}})))


def _short(over):
    return build_config(
        deep_merge(_cfg(), deep_merge({"train": {"steps": 12, "log_every": 4}, "eval": {"every": 0}}, over))
    )


class _Direct(training.Batches):
    """Every draw made directly from its generator, as before draws were staged."""

    def begin(self, step: int) -> None:
        pass


class _Buffered(training.Batches):
    """The device path on the CPU: every step's draws through one float64 buffer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.draws = StepDraws(self.seed, self.device, buffer=True)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"loss": {"name": "wgan-gp"}, "train": {"ada": {"enabled": True, "interval": 2}}},
        {
            "data": {"name": "digits"},
            "model": {"arch": "dcgan", "conditional": True, "hidden": 8},
            "train": {"batch_size": 16, "n_critic": 2, "ada": {"enabled": True, "interval": 2}},
        },
    ],
)
def test_staged_draws_train_the_same_weights_as_direct_draws_and_stage_every_draw_after_step_0(over):
    cfg = _short(over)
    image = cfg.model.arch == "dcgan"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1 if image else torch.randn(256, 2, generator=g)
    y = torch.randint(0, 10, (len(x),), generator=g) if image else None
    k = 10 if image else 0
    weights, direct = [], []
    for cls in (_Buffered, _Direct, training.Batches):
        gan = training.build_gan(cfg, list(x.shape[1:]), "cpu", k or None)
        gan.ada_p = 0.5  # augmentations really applied
        batches = cls(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, y=y, num_classes=k)
        training.train(gan, cfg, batches)
        weights.append([t.clone() for t in gan.G.state_dict().values()])
        direct.append(batches.draws.direct)
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # buffered == direct
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[1]))  # served as drawn (CPU) == direct
    one_step = training.Batches(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, y=y, num_classes=k)
    training.train(
        training.build_gan(cfg, list(x.shape[1:]), "cpu", k or None),
        build_config(deep_merge(cfg.to_dict(), {"train": {"steps": 1}})),
        one_step,
    )
    assert direct[0] == direct[2] == one_step.draws.direct > 0  # only step 0, before a plan exists, draws directly
    assert direct[1] == cfg.train.steps * direct[0]


def test_a_stream_that_leaves_the_plan_draws_what_a_fresh_generator_draws():
    draws = StepDraws(seed=3)
    draws.begin(0)
    s = draws.stream(0, 5)
    s.rand(4), s.randn(2, 3)
    draws.begin(1)  # plan: phase 5, rand(4) then randn(2, 3)
    s = draws.stream(1, 5)
    got = [s.rand(4), s.randint(0, 9, (5,))]  # the second call differs from the plan
    g = step_generator(3, 1, 5)
    assert torch.equal(got[0], torch.rand(4, generator=g))
    assert torch.equal(got[1], torch.randint(0, 9, (5,), generator=g))


def test_large_training_data_stay_in_host_memory():
    x = torch.zeros(1000, 4)
    assert training.place_data(x, "cpu") is x
    assert training.place_data(x, META, limit=x.numel() * 4 - 1) is x  # over the limit: batches are copied
    assert training.place_data(x, META, limit=x.numel() * 4).device == META


@pytest.mark.parametrize(
    "uri,bad",
    [
        ("sqlite:////repo/mlflow.db", True),
        ("/repo/mlruns", True),
        ("file:///repo/mlruns", True),
        ("http://127.0.0.1:5000", True),
        ("http://localhost:5000", True),
        ("http://tracker.internal:5000", False),
        ("https://user:secret@10.0.0.9:5000", False),
    ],
)
def test_a_tracking_store_other_nodes_cannot_reach_is_refused_on_a_multi_node_cluster(uri, bad):
    assert tracking_placement_problem(uri, "10.0.0.1", ["10.0.0.1", "10.0.0.1"]) is None  # one machine
    problem = tracking_placement_problem(uri, "10.0.0.1", ["10.0.0.1", "10.0.0.2"])
    assert (problem is not None) == bad
    if bad:
        assert problem.startswith("tracking.uri: ") and "10.0.0.2" in problem
