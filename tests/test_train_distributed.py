"""Multi-process training on CPU (gloo): sync-BN on the fused path equals one process on the combined batch.

Two processes on 127.0.0.1, spawned with ``torch.multiprocessing``; each gets an
unequal share of one batch (sync-BN must sum the counts too). The oracle is a
plain FastResNet in this process, on the whole batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from resnet_fast.models.resnet import BasicBlock, FastResNet

WORLD_SIZE = 2
SHARES = (2, 4)  # images per process: unequal on purpose
NUM_CLASSES = 5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model() -> FastResNet:
    torch.manual_seed(0)
    model = FastResNet(BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES, small_input=True, backend="reference")
    with torch.no_grad():  # non-trivial affine BN parameters, so their gradients matter
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(sum(SHARES), 3, 8, 8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (sum(SHARES),), generator=generator)
    return images, labels


def one_step(model: torch.nn.Module, parameters_of: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             loss_scale: float) -> dict:
    """Forward, backward and an SGD step; what the comparison needs."""
    optimizer = torch.optim.SGD(parameters_of.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    out = model(images)
    # Sum-reduced and scaled so that DDP's average over processes equals the mean over the whole batch.
    loss = F.cross_entropy(out, labels, reduction="sum") * loss_scale
    loss.backward()
    grads = {name: p.grad.clone() for name, p in parameters_of.named_parameters()}
    optimizer.step()
    buffers = {name: b.clone() for name, b in parameters_of.named_buffers()}
    params = {name: p.detach().clone() for name, p in parameters_of.named_parameters()}
    return {"out": out.detach(), "grads": grads, "buffers": buffers, "params": params}


def _worker(rank: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from resnet_fast.train.distributed import enable_sync_bn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = tiny_model()
        marked = enable_sync_bn(model)
        ddp = DistributedDataParallel(model)
        images, labels = batch()
        start = sum(SHARES[:rank])
        mine = slice(start, start + SHARES[rank])
        result = one_step(ddp, model, images[mine], labels[mine], WORLD_SIZE / sum(SHARES))
        result["marked"] = marked
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4,
                  atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: sync-BN on 2 processes != 1 process on the whole batch\n{m}")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_sync_bn_ddp_step_equals_single_process_on_combined_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    model = tiny_model()
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert ranks[0]["marked"] == batch_norms == 12, "every BatchNorm2d of the model should be marked for sync-BN"

    images, labels = batch()
    expected = one_step(model, model, images, labels, 1.0 / sum(SHARES))

    _assert_close(torch.cat([r["out"] for r in ranks]), expected["out"], "outputs")
    # The comparison can tell: per-process (unsynchronised) batch statistics give other outputs.
    local = torch.cat([tiny_model()(part) for part in images.split(list(SHARES))]).detach()
    assert (local - expected["out"]).abs().max() > 1e-2, "test batch too easy: local BN matches global BN"
    for rank, result in enumerate(ranks):
        for name, grad in expected["grads"].items():
            _assert_close(result["grads"][name], grad, f"rank {rank} gradient of {name}", rtol=1e-3, atol=1e-5)
        for name, buffer in expected["buffers"].items():
            if buffer.is_floating_point():
                _assert_close(result["buffers"][name], buffer, f"rank {rank} {name}")
            else:
                assert torch.equal(result["buffers"][name], buffer), f"rank {rank} {name}"
        for name, param in expected["params"].items():
            _assert_close(result["params"][name], param, f"rank {rank} {name} after the SGD step")


@pytest.mark.slow
def test_torchrun_cli_with_sync_bn(tmp_path):
    """``torchrun --nproc-per-node 2 -m resnet_fast.cli train --sync-bn``: runs, and only rank 0 writes."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import make_image_folder

    data_dir = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "resnet_fast.cli", "train", "--data",
               "imagefolder", "--data-dir", data_dir, "--image-size", "8", "--batch-size", "4", "--max-steps", "2",
               "--backend", "reference", "--sync-bn", "--device", "cpu", "--out", str(out), "--json",
               str(tmp_path / "metrics.json")]
    completed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"torchrun failed:\n{completed.stdout}\n{completed.stderr}"
    assert "sync-BN" in completed.stderr and "2 processes" in completed.stderr
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["config"]["sync_bn"] is True
    assert not any(key.startswith("module.") for key in saved["model"]), "saved keys must be torchvision's"
