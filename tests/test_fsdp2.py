"""FSDP2 (``torch.distributed.fsdp.fully_shard``, gloo, two CPU processes) over lora_fast layers.

What works (and is checked here against a single-process run on the whole batch):
* ``apply_lora`` / ``NF4LoRALinear`` models: the NF4 bytes are buffers (replicated on every rank),
  lora_A / lora_B (and any trainable parameter) are sharded; gradients equal the single process.
* A PEFT QLoRA model (bitsandbytes ``Linear4bit`` bases) patched by ``lora_fast.patch``, sharded
  with the frozen 4-bit weights in ``ignored_params`` (replicated): same.
What does not: sharding the bitsandbytes ``Params4bit`` weights themselves -- FSDP2 turns them into
plain tensors without their quant_state; the patched layer then raises an error that says so and
names the way out (checked here too).
"""
import os
import warnings

import pytest
import torch
import torch.distributed as dist

from mp_ranks import run_ranks

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

WORLD = 2


def _fsdp_available() -> bool:
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except Exception:
        return False
    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _fsdp_available(), reason="needs torch.distributed with gloo and FSDP2")


def _nf4_apply_lora():
    from test_ddp import _nf4_apply_lora as build

    return build()


def _peft_qlora_patched():
    import lora_fast
    from test_patch import peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_model(nf4=True)
    lora_fast.patch(model)
    return model


BUILDERS = {"nf4_apply_lora": _nf4_apply_lora, "peft_qlora_patched": _peft_qlora_patched}


def _layers(model):
    inner = model.base_model.model if hasattr(model, "peft_config") else model  # PEFT wraps the CausalLM
    return inner.model.layers


def _bnb_weights(model):
    import bitsandbytes as bnb

    return {m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}


def _batch():
    return torch.randint(0, 128, (2 * WORLD, 8), generator=torch.Generator().manual_seed(5))


def _full_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad
            out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _worker(rank, port, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        ids = _batch()[2 * rank: 2 * rank + 2]
        for key, build in BUILDERS.items():
            model = build().train()
            ignored = _bnb_weights(model)
            for layer in _layers(model):
                fully_shard(layer, mesh=mesh, ignored_params=ignored)
            fully_shard(model, mesh=mesh, ignored_params=ignored)
            model(input_ids=ids, labels=ids).loss.backward()
            grads = _full_grads(model)
            # save_adapter cannot write sharded adapters: a clear error, not safetensors' "invalid
            # python storage" (raised before any file or collective)
            import lora_fast

            try:
                lora_fast.save_adapter(model, os.path.join(out_dir, f"adapter_{key}_{rank}"))
                save_msg = "no error"
            except ValueError as exc:
                save_msg = str(exc)
            if rank == 0:
                torch.save(grads, os.path.join(out_dir, f"{key}.pt"))
                with open(os.path.join(out_dir, f"{key}_save.txt"), "w") as fh:
                    fh.write(save_msg)
        # sharding the bitsandbytes weights too: the patched layer must say what is unsupported
        model = _peft_qlora_patched().train()
        for layer in _layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            model(input_ids=ids, labels=ids)
            msg = "no error"
        except RuntimeError as exc:
            msg = str(exc)
        if rank == 0:
            with open(os.path.join(out_dir, "sharded_bnb.txt"), "w") as fh:
                fh.write(msg)
        # drain collectives still in flight (FSDP2 prefetches the next all-gather; the sharded-bnb
        # forward above stops mid-model) before tearing the group down: destroying it under
        # pending gloo work aborts the process ("terminate called without an active exception").
        # Only on success: a rank that raised must not wait here for a peer in another collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_workers(out_dir, timeout_s=300.0):
    wanted = [os.path.join(out_dir, f"{key}.pt") for key in BUILDERS] + [os.path.join(out_dir, "sharded_bnb.txt")]
    run_ranks(_worker, WORLD, out_dir, wanted, "FSDP2", timeout_s)


def test_fsdp2_gloo_two_processes_matches_single_process(tmp_path):
    _run_workers(str(tmp_path))
    ids = _batch()
    for key, build in BUILDERS.items():
        model = build().train()
        model(input_ids=ids, labels=ids).loss.backward()
        expected = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        got = torch.load(os.path.join(tmp_path, f"{key}.pt"))
        assert got.keys() == expected.keys() and len(got) == 28, key
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{key}: {name}")
        save_msg = open(os.path.join(tmp_path, f"{key}_save.txt")).read()
        assert "sharded DTensors" in save_msg and "get_model_state_dict" in save_msg, save_msg
    msg = open(os.path.join(tmp_path, "sharded_bnb.txt")).read()
    assert "FSDP2" in msg and "ignored_params" in msg and "quant_state" in msg, msg
