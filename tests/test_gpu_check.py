"""bench/gpu_check.py on CPU with the tiny Qwen3: the whole online + offline step runs and reports sane figures."""

import math

import pytest
import torch

from bench.gpu_check import QWEN3_0_6B, build_model, build_tokenizer, main


def test_tokenizer_has_the_model_vocabulary_and_decodes_every_id():
    tokenizer = build_tokenizer(600)
    assert (
        len(tokenizer) == 600
        and tokenizer.eos_token == "<|im_end|>"
        and tokenizer.pad_token_id != tokenizer.eos_token_id
    )
    assert all(tokenizer.decode([i]).strip() for i in range(3 + 256, 600))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.decode(ids) == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"


def test_full_size_config_is_qwen3_0_6b():
    model = build_model(QWEN3_0_6B, build_tokenizer(QWEN3_0_6B["vocab_size"]), "sdpa", torch.device("meta"))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert 0.55e9 < sum(p.numel() for p in model.parameters()) < 0.65e9


@pytest.mark.slow
def test_tiny_check_runs_both_steps_on_cpu(capsys):
    result = main(["--tiny", "--device", "cpu", "--batch_size", "2", "--new_tokens", "6", "--matmul_size", "128"])
    printed = capsys.readouterr().out
    assert "online step" in printed and "offline step" in printed and "MFU" in printed
    assert result["architecture"] == "Qwen3ForCausalLM" and result["params"] < 1e6
    online, offline = result["online"], result["offline"]
    assert 0 < online["generated_tokens"] <= 12 and online["completion_tokens"] == online["generated_tokens"]
    for phase in (online, offline):
        assert all(
            phase[key] > 0
            for key in ("teacher_s", "student_fwd_s", "backward_s", "step_s", "train_mfu", "peak_memory_gib")
        )
    assert math.isfinite(offline["loss"]) and offline["completion_tokens"] <= 2 * 6


@pytest.mark.slow
def test_tiny_scaling_figures_on_cpu_processes(capsys, monkeypatch):
    """--scaling on CPU: the tiny model saved, then 1 process, 2 DDP and 2 FSDP2 processes measured by
    bench/online_scaling.py."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = main(
        ["--tiny", "--device", "cpu", "--batch_size", "2", "--new_tokens", "4", "--matmul_size", "128", "--scaling"]
    )
    printed = capsys.readouterr().out
    assert "hf        x1" in printed and "hf        x2 ddp" in printed and "hf        x2 fsdp2" in printed
    figures = {(r["engine"], r["processes"], r["parallelism"]): r for r in result["scaling"]}
    assert set(figures) >= {("hf", 1, "none"), ("hf", 2, "ddp"), ("hf", 2, "fsdp2")}
    assert all(r["interactions_per_s"] > 0 and r["train_s"] > 0 for r in figures.values())
