"""The same training script under torchrun (2 CPU processes, gloo) follows the single-process trajectory."""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

SCRIPT = textwrap.dedent('''
    """A user's training script: nothing in it knows about processes."""
    import sys

    import torch

    import os

    from physmdn.models import CFM, MDN
    from physmdn.physics import Polynomial
    from physmdn.training import fit, is_main_process


    def toy(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = 0.1 + 0.9 * torch.rand(n, 1, generator=g)
        upper = torch.rand(n, generator=g) < 0.5
        y = torch.where(upper, 1.0, -1.0).unsqueeze(-1) * x.sqrt() + 0.05 * torch.randn(n, 1, generator=g)
        labels = torch.where(upper, 1, 0)
        labels[::3] = -1
        return x, y, labels


    def main(out, workdir):
        torch.manual_seed(0)
        model = MDN(1, 1, 2, hidden=(16, 16))
        x_val, y_val, _ = toy(101, 1)
        result = fit(model, toy(300, 0), (x_val, y_val), epochs=3, batch_size=64, lr=1e-2, seed=1,
                     physics=Polynomial([0.0, 0.0, 1.0], mode="mean"), physics_weight=0.01,
                     restore_best=False, progress=False, checkpoint_dir=workdir,
                     history_path=workdir + "/history.json")
        if is_main_process():
            torch.save({"state": model.state_dict(), "history": result.history,
                        "world_size": result.extra["world_size"], "steps": result.global_step}, out)
        # a flow model with OT couplings and a residual: every process keeps the same replica
        torch.manual_seed(0)
        flow = CFM(1, 1, hidden=(16, 16), coupling="ot")
        fit(flow, toy(300, 0)[:2], epochs=2, batch_size=64, physics=lambda y, x: y.square() - x, progress=False)
        torch.save(flow.state_dict(), f"{out}.cfm.rank{os.environ.get('RANK', '0')}")
        # gradient accumulation (groups of 2, 2, 1 micro-batches: the partial one is averaged across processes by
        # hand) and a callback that stops after epoch 1 on rank 0 only: every process stops with it
        torch.manual_seed(0)
        accumulated = MDN(1, 1, 2, hidden=(16, 16))
        rank = int(os.environ.get("RANK", "0"))
        stop = type("Stop", (), {"on_epoch_end": lambda self, epoch, metrics: epoch == 1 and rank == 0})()
        acc_result = fit(accumulated, toy(300, 0), epochs=4, batch_size=64, lr=1e-2, seed=1, accumulate_steps=2,
                         val_split=0, callbacks=[stop], progress=False)
        if is_main_process():
            torch.save({"state": accumulated.state_dict(), "steps": acc_result.global_step,
                        "stopped": acc_result.stopped}, f"{out}.acc")


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
''')


pytestmark = pytest.mark.usefixtures("one_thread")


def test_torchrun_two_processes_match_single_process(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)

    # single process, in this interpreter
    spec = importlib.util.spec_from_file_location("train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "single").mkdir()
    module.main(str(tmp_path / "single.pt"), str(tmp_path / "single"))

    # two processes, through torchrun, unchanged script
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    (tmp_path / "ddp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "ddp.pt"), str(tmp_path / "ddp")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 240 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-6000:]

    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert single["steps"] == ddp["steps"] == 15  # 300 samples, global batch 64: 5 steps per epoch, 3 epochs
    # the parameters moved, and both runs moved them the same way
    torch.manual_seed(0)
    from physmdn.models import MDN

    initial = MDN(1, 1, 2, hidden=(16, 16)).state_dict()
    assert (single["state"]["trunk.0.weight"] - initial["trunk.0.weight"]).abs().max() > 1e-2
    for name, value in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for row_single, row_ddp in zip(single["history"], ddp["history"]):
        for key in ("train_loss", "train_data", "train_regime", "val_loss", "val_data"):
            assert row_ddp[key] == pytest.approx(row_single[key], rel=1e-5, abs=1e-6), key
        for key in ("train_physics", "val_physics"):  # logged as (loss - nll) / 0.01: rounding amplified 100x
            assert row_ddp[key] == pytest.approx(row_single[key], rel=1e-3), key
    # rank 0 alone wrote the files, and the checkpoint holds one RNG state per process
    assert (tmp_path / "ddp" / "history.json").is_file() and (tmp_path / "ddp" / "last.pt").is_file()
    assert len(torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["rng"]) == 2
    assert not list((tmp_path / "ddp").glob("*.tmp*"))
    flows = [torch.load(f"{tmp_path / 'ddp.pt'}.cfm.rank{r}", weights_only=True) for r in (0, 1)]
    for name, value in flows[0].items():
        assert torch.equal(flows[1][name], value), name
    assert torch.isfinite(flows[0]["net.0.weight"]).all()
    acc_single = torch.load(f"{tmp_path / 'single.pt'}.acc", weights_only=True)
    acc_ddp = torch.load(f"{tmp_path / 'ddp.pt'}.acc", weights_only=True)
    assert acc_single["stopped"] == acc_ddp["stopped"] == "callback"
    assert acc_single["steps"] == acc_ddp["steps"] == 6  # 3 optimizer steps per epoch (2 + 2 + 1), 2 epochs
    for name, value in acc_single["state"].items():
        torch.testing.assert_close(acc_ddp["state"][name], value, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
