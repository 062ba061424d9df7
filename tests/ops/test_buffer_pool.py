"""The CPU buffer pool behind the ops' large outputs (csrc/cpu/buffer_pool.cpp)."""

import multiprocessing as mp
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import physmdn
from physmdn import reference
from conftest import rel_err

B, K, D = 4096, 8, 4  # gradients of means: 512 KiB, above the pool's 256 KiB threshold


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g), 0.3 * torch.randn(B, K, D, generator=g),
            torch.randn(B, D, generator=g)]


def grads(ps):
    ps = [p.detach().clone().requires_grad_(True) for p in ps]
    return torch.autograd.grad(physmdn.mixture_nll(*ps, reduction="mean"), ps)


@pytest.fixture
def pool_limit():
    previous = physmdn.set_cpu_pool_limit(64 << 20)
    physmdn.cpu_pool_release()
    yield
    physmdn.set_cpu_pool_limit(previous)


def test_freed_gradients_are_reused(pool_limit):
    ps = inputs()
    first = [g.clone() for g in grads(ps)]  # the op's outputs are freed at the end of the call
    before = physmdn.cpu_pool_stats()
    assert before["cached_bytes"] >= 2 * B * K * D * 4
    second = grads(ps)
    after = physmdn.cpu_pool_stats()
    assert after["hits"] >= before["hits"] + 2  # grad_means, grad_log_scales at least
    assert after["live_bytes"] >= 2 * B * K * D * 4
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # reused memory, same numbers
    exact = [p.double().requires_grad_(True) for p in ps]
    for g, rg in zip(second, torch.autograd.grad(reference.mixture_nll(*exact).mean(), exact)):
        assert rel_err(g.double(), rg) <= 1e-5


def test_limit_zero_caches_nothing(pool_limit):
    assert physmdn.set_cpu_pool_limit(0) == 64 << 20
    grads(inputs())
    stats = physmdn.cpu_pool_stats()
    assert stats["cached_bytes"] == 0 and stats["limit_bytes"] == 0
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0, got -1"):
        physmdn.set_cpu_pool_limit(-1)


def test_limit_bounds_the_cache(pool_limit):
    physmdn.set_cpu_pool_limit(600 * 1024)  # room for one 512 KiB block
    grads(inputs())
    assert 0 < physmdn.cpu_pool_stats()["cached_bytes"] <= 600 * 1024
    physmdn.cpu_pool_release()
    assert physmdn.cpu_pool_stats()["cached_bytes"] == 0


def test_pooled_tensors_behave_like_torch_tensors(pool_limit):
    gm = grads(inputs())[1]
    ref = gm.clone()
    # the pool's blocks are fixed-size storages (the stable ABI makes tensors over memory it does not allocate)
    with pytest.raises(RuntimeError, match="not resizable"):
        gm.resize_(2 * B, K, D)
    assert torch.equal(gm.clone().resize_(2 * B, K, D)[:B], ref)  # a clone is an ordinary tensor
    gm = grads(inputs())[1]
    assert np.array_equal(gm.numpy(), ref.numpy())  # numpy shares the memory
    assert torch.equal(pickle.loads(pickle.dumps(gm)), ref)
    gm2 = grads(inputs())[1]
    gm2.share_memory_()
    assert gm2.is_shared() and torch.equal(gm2, ref)


def _child(q):
    q.put(physmdn.cpu_pool_stats())


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_fork_child_gets_a_fresh_pool(pool_limit):
    """A forked child must not inherit the parent's pool (its mutex may be held by another thread at the fork):
    the atfork handler gives it a new, empty one."""
    keep = grads(inputs())  # the parent's pool has live blocks and counters
    assert physmdn.cpu_pool_stats()["misses"] > 0
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    stats = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert stats["live_bytes"] == 0 and stats["misses"] == 0 and stats["cached_bytes"] == 0
    del keep


def test_environment_variable():
    code = "import physmdn; print(physmdn.cpu_pool_stats()['limit_bytes'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PHYSMDN_CPU_POOL_MB": "3"},
                         capture_output=True, text=True, check=True).stdout
    assert int(out.strip().splitlines()[-1]) == 3 << 20
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PHYSMDN_CPU_POOL_MB": "lots"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "PHYSMDN_CPU_POOL_MB must be a finite number of MiB in [0, 1048576] (0 disables the pool), got 'lots'" in bad.stderr


def test_changed_shape_mix_gets_hits_again(pool_limit):
    """Least-recently-freed eviction: after random shapes fill the pool, a fixed-shape loop is served from it."""
    physmdn.set_cpu_pool_limit(8 << 20)
    g = torch.Generator().manual_seed(0)
    for i in range(60):  # random batch sizes, each output >= 256 KiB: the pool fills with sizes never asked again
        b = int(torch.randint(2048, 8192, (1,), generator=g))
        ps = [torch.randn(b, K), torch.randn(b, K, D), 0.3 * torch.randn(b, K, D), torch.randn(b, D)]
        grads(ps)
    assert physmdn.cpu_pool_stats()["cached_bytes"] > 4 << 20
    ps = inputs()
    grads(ps)
    before = physmdn.cpu_pool_stats()
    for _ in range(10):
        grads(ps)
    after = physmdn.cpu_pool_stats()
    assert after["hits"] - before["hits"] >= 20, (before, after)
    assert after["cached_bytes"] <= 8 << 20


_FORK_SCENARIO = """
import gc, multiprocessing as mp, pickle, sys
import torch, physmdn

B, K, D = 4096, 8, 4
def grads(seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g), 0.3 * torch.randn(B, K, D, generator=g),
          torch.randn(B, D, generator=g)]
    ps = [p.requires_grad_(True) for p in ps]
    return list(torch.autograd.grad(physmdn.mixture_nll(*ps, reduction="mean"), ps))

INHERITED = grads(0)  # live pooled tensors the child inherits
grads(1)  # and cached blocks
assert physmdn.cpu_pool_stats()["cached_bytes"] > 0

def child(q):
    torch.set_num_threads(1)  # (no OpenMP pool across fork)
    start = physmdn.cpu_pool_stats()
    INHERITED.clear()  # frees the parent's pooled tensors in the child
    gc.collect()
    end = physmdn.cpu_pool_stats()
    grads(2)  # the child's own pool works
    q.put((start, end, physmdn.cpu_pool_stats()))

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    result = q.get(timeout=120)
    p.join(60)
    sys.stdout.write(pickle.dumps((p.exitcode, result)).hex())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_fork_child_frees_inherited_blocks_outside_its_accounting(tmp_path):
    """Blocks a forked child inherited (live tensors of the parent) are freed without entering its accounting or
    its cache: live_bytes never goes negative, the child's pool starts empty and then serves its own blocks. (In a
    fresh interpreter: a process whose autograd engine has started threads cannot fork safely.)"""
    script = tmp_path / "fork_scenario.py"
    script.write_text(_FORK_SCENARIO)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PHYSMDN_CPU_POOL_MB": "64"})
    assert out.returncode == 0, out.stderr
    exitcode, (start, end, used) = pickle.loads(bytes.fromhex(out.stdout.strip().splitlines()[-1]))
    assert exitcode == 0
    assert start["cached_bytes"] == 0 and start["live_bytes"] == 0, start
    assert end["live_bytes"] == 0 and end["cached_bytes"] == 0, end
    assert used["misses"] > 0 and used["live_bytes"] >= 0 and used["cached_bytes"] > 0, used


@pytest.mark.parametrize("value", ["inf", "1e30", "-1", "nan", "abc", "", "2e6"])
def test_pool_limit_environment_is_validated(value):
    code = "import torch, physmdn; print(physmdn.cpu_pool_stats()['limit_bytes'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PHYSMDN_CPU_POOL_MB": value},
                         capture_output=True, text=True)
    if value == "":  # unset: the default
        assert out.returncode == 0 and int(out.stdout) == 256 << 20
        return
    assert out.returncode != 0
    assert "PHYSMDN_CPU_POOL_MB must be a finite number of MiB" in out.stderr and repr(value) in out.stderr.replace('"', "'"), out.stderr
