"""TRL's SFTTrainer trains a patched PEFT model unchanged, with PEFT's loss (tiny Llama, CPU)."""
import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
peft = pytest.importorskip("peft")

import lora_fast  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)}
    vocab.update({"<unk>": 120, "<pad>": 121, "<s>": 122, "</s>": 123})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def _train(patched: bool, tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if patched:
        report = lora_fast.patch(model)
        assert len(report.converted) == 14 and not report.skipped
    ds = Dataset.from_dict({"text": [" ".join(f"w{(i * 7 + j) % 120}" for j in range(16)) for i in range(16)]})
    args = trl.SFTConfig(output_dir=str(tmp_path / ("p" if patched else "u")), max_steps=3,
                         per_device_train_batch_size=4, report_to="none", use_cpu=True, logging_steps=1,
                         save_strategy="no", max_length=32, seed=0, data_seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=_tokenizer())
    lora_fast.dispatch_stats(reset=True)
    out = trainer.train()
    return out.training_loss, lora_fast.dispatch_stats()


def test_sft_trainer_patched_matches_peft(tmp_path):
    loss_peft, _ = _train(False, tmp_path)
    loss_fast, stats = _train(True, tmp_path)
    assert stats.get("torch:reference", 0) > 0, stats  # the patched layers ran through lora_fast
    assert loss_fast == pytest.approx(loss_peft, rel=1e-4, abs=1e-4)
