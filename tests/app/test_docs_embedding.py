"""docs/embedding.md runs as written: its Python blocks are executed section by section (the first section's
namespace shared, as on the page), and the block marked ``<!-- file: NAME -->`` runs under torchrun with two CPU
processes. The code's own asserts check the result (the branches of the toy at x = 0.64, identical replicas)."""

import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "embedding.md"
FENCE = re.compile(r"(?:<!-- file: (?P<file>[\w.]+) -->\n)?```python\n(?P<code>.*?)```", re.S)

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks() -> list[dict]:
    """``{"section", "file", "code"}`` per fenced Python block, in page order; ``section`` is the ``##`` heading
    above it."""
    text = PAGE.read_text()
    found = []
    for match in FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        found.append({"section": headings[-1] if headings else "", "file": match.group("file"),
                      "code": match.group("code")})
    return found


def run_sections(*sections: str) -> dict:
    """Execute the inline blocks of ``sections`` in page order in one namespace."""
    namespace = {"__name__": "docs_embedding"}
    ran = 0
    for block in blocks():
        if block["file"] is None and any(block["section"].startswith(s) for s in sections):
            exec(compile(block["code"], f"{PAGE}:{block['section']}", "exec"), namespace)
            ran += 1
    assert ran, f"no blocks under {sections}"
    return namespace


def test_the_page_has_the_four_sections():
    sections = [b["section"] for b in blocks()]
    for name in ("A plain PyTorch loop", "Under torch.compile", "Under DistributedDataParallel", "With Lightning"):
        assert any(s.startswith(name) for s in sections), name
    assert [b["file"] for b in blocks() if b["file"]] == ["train_ddp.py"]


def test_plain_pytorch_loop():
    namespace = run_sections("A plain PyTorch loop")
    assert "net" in namespace and "model" in namespace


@pytest.mark.slow  # inductor compiles the graph: ~20 s on two CPU cores
def test_under_torch_compile():
    run_sections("A plain PyTorch loop", "Under torch.compile")


@pytest.mark.slow  # two processes start and import torch: ~10 s
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_under_ddp_with_torchrun(tmp_path):
    (code,) = [b["code"] for b in blocks() if b["file"] == "train_ddp.py"]
    (tmp_path / "train_ddp.py").write_text(code)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # the page's CPU path: gloo
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train_ddp.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 300 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-6000:]
    assert "2 processes; modes at x = 0.64" in output, output[-3000:]


@pytest.mark.slow  # the first section, then Lightning imports and trains: ~8 s
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None
                    and importlib.util.find_spec("pytorch_lightning") is None,
                    reason="Lightning is not installed (pip install lightning)")
def test_with_lightning():
    run_sections("A plain PyTorch loop", "With Lightning")
