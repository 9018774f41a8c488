"""densecontrast.engine.launch: single-process fallback, seeding, preemption signals, and one real
2-process gloo run through ``init_distributed`` (torchrun's environment variables): DDP wrapping,
preemption agreement, per-rank RNG states and the collective training-state save."""

from __future__ import annotations

import os
import random
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from densecontrast.engine import (
    PreemptionHandler,
    cleanup,
    init_distributed,
    save_checkpoint,
    save_training_state,
    wrap_ddp,
)
from densecontrast.engine import launch as L
from densecontrast.random_state import gather_rng_states, seed_everything, set_rng_state

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR")


@pytest.fixture
def no_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)


def test_init_distributed_without_env_is_single_process(no_launch_env: None) -> None:
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (0, 1, 0, False)
    assert info.is_main
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()
    assert init_distributed(device="cpu").device == torch.device("cpu")
    cleanup()  # no group: must be a no-op


def test_init_distributed_rejects_bad_env(no_launch_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed()
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        init_distributed()
    with pytest.raises(ValueError, match="backend"):
        init_distributed(backend="carrier-pigeon")


def test_slurm_env_without_master_addr_is_single_process(no_launch_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert L._launch_env() is None  # no rendezvous address: do not guess
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
        monkeypatch.setenv(v, "")  # registered for restoration; empty counts as unset
    assert L._launch_env() == (1, 4, 1)
    assert os.environ["RANK"] == "1" and os.environ["WORLD_SIZE"] == "4"


def _draw() -> tuple[float, list[float], list[float]]:
    return random.random(), torch.rand(3).tolist(), np.random.rand(3).tolist()


def test_seed_everything_per_rank() -> None:
    assert seed_everything(5, rank=2) == 7
    a = _draw()
    seed_everything(5, rank=2)
    assert _draw() == a
    seed_everything(5, rank=3)
    b = _draw()
    assert all(x != y for x, y in zip(a, b))
    seed_everything(6, rank=2)  # seed + rank collides on purpose: documented as seed + rank
    assert _draw() == b
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)
    with pytest.raises(ValueError, match="rank"):
        seed_everything(0, rank=-1)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_handler_catches_and_restores(sig: str) -> None:
    signum = getattr(signal, sig)
    seen: list[int] = []

    def previous(s: int, frame: object) -> None:
        seen.append(s)

    old = signal.signal(signum, previous)
    try:
        with PreemptionHandler() as h:
            assert not h.should_stop
            assert signal.getsignal(signum) != previous
            os.kill(os.getpid(), signum)  # would terminate the test run if not caught
            assert h.should_stop and h.received == signum
            assert h.synchronize() is True  # no process group: the local flag
        assert seen == []  # the previous handler was not called while ours was installed
        assert signal.getsignal(signum) is previous
        os.kill(os.getpid(), signum)
        assert seen == [signum]  # and it is live again
    finally:
        signal.signal(signum, old)


def test_preemption_handler_restores_on_exception_and_request_stop() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="boom"), PreemptionHandler(signals=[signal.SIGTERM]) as h:
        assert signal.getsignal(signal.SIGTERM) != before
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) == before
    h = PreemptionHandler()
    assert not h.should_stop
    h.request_stop()
    assert h.should_stop
    with pytest.raises(ValueError, match="signals"):
        PreemptionHandler(signals=[])


# --------------------------------------------------------------------------- real 2-process run
WORLD = 2


def _worker(local_rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(local_rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    out: dict = {"info": [info.rank, info.world_size, info.local_rank, int(info.distributed), info.device.type]}
    # wrap_ddp: per-rank initialisations, then rank 0's online weights and state module everywhere
    torch.manual_seed(100 + info.rank)
    online, state_module = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ddp = wrap_ddp(online, info, state_module)
    out["ddp"] = int(isinstance(ddp, torch.nn.parallel.DistributedDataParallel))
    out["weights"] = torch.cat([online.weight.detach().flatten(), state_module.weight.detach().flatten()])
    # save_training_state: BatchNorm running statistics broadcast from rank 0, rank copies written
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(info.rank + 1))
    save_training_state(os.path.join(tmp, "training.pth"), {"bn": bn}, step=5, rank_copy=True)
    out["bn_mean"] = bn.running_mean.clone()
    # preemption: only rank 1 is signalled; synchronize() makes both stop
    h = PreemptionHandler()
    if info.rank == 1:
        h.request_stop()
    out["stop"] = [int(h.should_stop), int(h.synchronize())]
    # per-rank RNG states: gather, continue, restore own entry
    seed_everything(0, info.rank)
    states = gather_rng_states()
    first = torch.rand(4)
    torch.rand(10)
    set_rng_state(states)
    out["rng"] = torch.stack([first, torch.rand(4)])
    out["saved"] = int(save_checkpoint({"rng": states}, os.path.join(tmp, "ckpt.pth")))
    torch.save(out, os.path.join(tmp, f"out_{info.rank}.pt"))
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_gloo_run(tmp_path, no_launch_env: None) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    outs = [torch.load(tmp_path / f"out_{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, o in enumerate(outs):
        assert o["info"] == [r, WORLD, r, 1, "cpu"]
        assert o["ddp"] == 1
        assert torch.equal(o["weights"], outs[0]["weights"])  # rank 1 starts from rank 0's weights
        assert torch.equal(o["bn_mean"], torch.ones(2))  # rank 0's statistics everywhere
        assert (tmp_path / f"rank{r}.pth").is_file()
        assert o["stop"] == [int(r == 1), 1]
        assert torch.equal(o["rng"][0], o["rng"][1])  # restored own state
        assert o["saved"] == int(r == 0)
    assert not torch.equal(outs[0]["rng"][0], outs[1]["rng"][0])  # ranks draw different numbers
    training = torch.load(tmp_path / "training.pth", weights_only=True)
    assert training["step"] == 5 and torch.equal(training["bn"]["running_mean"], torch.ones(2))
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert len(ckpt["rng"]["per_rank"]) == WORLD
    # a single process cannot adopt a 2-rank RNG state
    with pytest.raises(ValueError, match="world size"):
        set_rng_state(ckpt["rng"])
