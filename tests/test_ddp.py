"""DistributedDataParallel (gloo, two CPU processes) over lora_fast layers gives the gradients of
a single-process run on the whole batch: a patched PEFT model and an apply_lora NF4 model."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lora_fast
from mp_ranks import run_ranks

pytest.importorskip("peft")
pytest.importorskip("transformers")

T7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORLD = 2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                      vocab_size=128, max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def _randomise_B(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _patched_peft():
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=T7))
    _randomise_B(model)
    report = lora_fast.patch(model)
    assert len(report.converted) == 14
    return model


def _nf4_apply_lora():
    import bitsandbytes as bnb

    model = _tiny_llama()
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in T7:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="nf4")
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q.to("cpu"))
    lora_fast.apply_lora(model, "all-linear", r=4, lora_alpha=8)
    _randomise_B(model)
    return model


BUILDERS = {"peft_patched": _patched_peft, "nf4_apply_lora": _nf4_apply_lora}


def _batch():
    ids = torch.randint(0, 128, (2 * WORLD, 8), generator=torch.Generator().manual_seed(5))
    return ids


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ids = _batch()[2 * rank: 2 * rank + 2]
        for key, build in BUILDERS.items():
            model = build().train()
            ddp = nn.parallel.DistributedDataParallel(model)
            ddp(input_ids=ids, labels=ids).loss.backward()
            if rank == 0:
                torch.save(_grads(model), os.path.join(out_dir, f"{key}.pt"))
        # drain collectives still in flight before tearing the group down: destroying it under
        # pending gloo work aborts the process ("terminate called without an active exception",
        # seen with FSDP2, tests/test_fsdp2.py).  Only on success: a rank that raised must not
        # wait here for a peer in another collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_workers(out_dir, timeout_s=300.0):
    wanted = [os.path.join(out_dir, f"{key}.pt") for key in BUILDERS]
    run_ranks(_worker, WORLD, out_dir, wanted, "DDP", timeout_s)


def test_ddp_gloo_two_processes_matches_single_process(tmp_path):
    _run_workers(str(tmp_path))
    ids = _batch()
    for key, build in BUILDERS.items():
        model = build().train()
        model(input_ids=ids, labels=ids).loss.backward()
        expected = _grads(model)
        got = torch.load(os.path.join(tmp_path, f"{key}.pt"))
        assert got.keys() == expected.keys() and len(got) == 28, key
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{key}: {name}")
