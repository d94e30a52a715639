"""Single-process pretraining runs, in-process (fast): outputs, resume bookkeeping, Muon, CPT, bad input."""

import json
import re
import shutil

import pytest
import yaml

from conftest import pretrain_args, read_losses
from launch.pretrain import main


def run(corpus, tokenizer_dir, out, **overrides):
    return main(pretrain_args(corpus, tokenizer_dir, out, **overrides))


def test_run_leaves_every_output(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    summary = run(corpus, tokenizer_dir, out, max_steps=6, save_steps=3, eval_steps=3, save_total_limit=1)
    names = {p.name for p in out.iterdir()}
    assert {"resolved_config.yaml", "plan.json", "metrics.jsonl", "loss.png", "final", "checkpoint-6"} <= names
    assert "checkpoint-3" not in names                           # pruned, after checkpoint-6 was complete
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s"} <= set(train_lines[0])
    assert any("eval_loss" in r and "eval_ppl" in r for r in records)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["micro_batch_size"] == 4 and plan["global_batch_size"] == 4 and plan["precision"] == "fp32"
    assert plan["attn_implementation"] == "sdpa" and "FlashAttention" in plan["attn_reason"]
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["block_size"] == 32
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["micro_step"] == 6 and state["samples_in_epoch"] == 24
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").eos_token == "<|endoftext|>"
    assert (out / "final" / "model.safetensors").is_file()
    assert summary["step"] == 6 and summary["eval_loss"] > 0
    assert model.config.vocab_size % 64 == 0


def test_accumulation_matches_bigger_micro_batch(corpus, tokenizer_dir, tmp_path):
    """micro 4 x accumulation 2 trains on the same global batch as micro 8: same losses (fp32)."""
    run(corpus, tokenizer_dir, tmp_path / "a", per_device_train_batch_size=8, max_steps=4)
    run(corpus, tokenizer_dir, tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4)
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for step in a:  # only summation order differs: ~1e-7 relative in fp32
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def test_gradient_checkpointing_same_losses(corpus, tokenizer_dir, tmp_path):
    run(corpus, tokenizer_dir, tmp_path / "a", max_steps=3)
    run(corpus, tokenizer_dir, tmp_path / "b", max_steps=3, gradient_checkpointing=True)
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)


def test_muon_lowers_the_loss(corpus, tokenizer_dir, tmp_path):
    run(corpus, tokenizer_dir, tmp_path / "m", optimizer="muon", max_steps=30, learning_rate="3e-3", logging_steps=5)
    losses = read_losses(tmp_path / "m")
    assert losses[30] < losses[5] - 0.5, losses


def test_continued_pretraining_from_final(corpus, tokenizer_dir, tmp_path):
    run(corpus, tokenizer_dir, tmp_path / "base", max_steps=20, learning_rate="3e-3")
    base = read_losses(tmp_path / "base")
    run(corpus, tokenizer_dir, tmp_path / "cpt", model_preset=None, tokenizer_name_or_path=None,
        model_name_or_path=tmp_path / "base" / "final", max_steps=3, seed=99)
    cpt = read_losses(tmp_path / "cpt")
    assert cpt[1] < base[1] - 1.0        # starts where the base run got to, not from a fresh init


def test_tensorboard_tracker(corpus, tokenizer_dir, tmp_path):
    run(corpus, tokenizer_dir, tmp_path / "tb", max_steps=2, report_to="tensorboard")
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def _exits_2(capsys, argv, pattern):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err


def test_bad_inputs_exit_2(corpus, tokenizer_dir, tmp_path, capsys):
    def args(**kw):
        return pretrain_args(corpus, tokenizer_dir, kw.pop("output_dir", tmp_path / "bad"), **kw)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "small.txt").write_text("a few words\n")
    (tmp_path / "r.yaml").write_text("learning_rate: 1e-3\nwarmup: 3\n")
    (tmp_path / "notamodel").mkdir()
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    _exits_2(capsys, args(train_files=tmp_path / "missing.jsonl"), r"--train_files .*missing\.jsonl: no such file")
    _exits_2(capsys, args(train_files=tmp_path / "empty.txt"), r"empty\.txt: no text found")
    _exits_2(capsys, args(train_files=tmp_path / "latin1.txt"), r"latin1\.txt:1: not valid UTF-8")
    _exits_2(capsys, args(train_files=tmp_path / "small.txt", block_size=512), r"fewer than one block of --block_size 512")
    _exits_2(capsys, args() + ["--bogus_flag", "1"], r"unknown flag --bogus_flag")
    _exits_2(capsys, args() + ["--config", str(tmp_path / "r.yaml")], r"r\.yaml:2: unknown key 'warmup'")
    _exits_2(capsys, args(block_size=4096), r"--block_size 4096 exceeds the 2048 positions")
    _exits_2(capsys, args(model_preset=None, model_name_or_path=tmp_path / "notamodel"), r"not a model directory \(no config\.json\)")
    _exits_2(capsys, args(deepspeed=ds), r"ds\.json: train_micro_batch_size_per_gpu=16 contradicts --per_device_train_batch_size=4")
    _exits_2(capsys, args(global_batch_size=6), r"--global_batch_size 6 is not a multiple of")
    _exits_2(capsys, args(model_preset="huge"), r"--model_preset huge: unknown preset")
    _exits_2(capsys, args(precision="fp16"), r"--precision fp16 needs a CUDA GPU")
    _exits_2(capsys, args(save_best=True, save_steps=4, eval_steps=3), r"--save_best needs --eval_steps dividing --save_steps")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not __import__("os").access(ro, __import__("os").W_OK):  # root ignores permissions
        _exits_2(capsys, args(output_dir=ro / "run"), r"--output_dir .*not writable")
    _exits_2(capsys, args(output_dir="/proc/trainrig-cannot-write"), r"--output_dir /proc/trainrig-cannot-write: not writable")


def test_save_best_keeps_lowest_eval_checkpoint(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "best"
    run(corpus, tokenizer_dir, out, max_steps=8, save_steps=2, eval_steps=2, save_total_limit=1, save_best=True,
        learning_rate="3e-3")
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r and r["step"] < 8}
    best_step = min(evals, key=evals.get)
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert f"checkpoint-{best_step}" in kept and "checkpoint-8" in kept and len(kept) <= 2


def test_dataloader_workers_same_losses(corpus, tokenizer_dir, tmp_path):
    run(corpus, tokenizer_dir, tmp_path / "a", max_steps=3)
    run(corpus, tokenizer_dir, tmp_path / "b", max_steps=3, dataloader_num_workers=2)
    assert read_losses(tmp_path / "a") == read_losses(tmp_path / "b")


@pytest.mark.slow
def test_wandb_offline(corpus, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "local-test-key-not-a-secret-0123456789")
    out = tmp_path / "wb"
    run(corpus, tokenizer_dir, out, max_steps=2, report_to="wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs, list(out.iterdir())
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl", ".log"))
    assert "local-test-key-not-a-secret" not in written


def test_resume_keeps_the_global_batch_not_its_factors(corpus, tokenizer_dir, tmp_path):
    """Micro 2 x accumulation 2 resumes a checkpoint of micro 4 x accumulation 1 (a smaller card):
    the same global batches, the losses as the uninterrupted run's but for reduction order."""
    full, out = tmp_path / "full", tmp_path / "resumed"
    run(corpus, tokenizer_dir, full, max_steps=4, save_steps=2)
    out.mkdir()
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    main(pretrain_args(corpus, tokenizer_dir, out, max_steps=4, resume="auto", per_device_train_batch_size=2,
                       gradient_accumulation_steps=2))
    expected, got = read_losses(full), read_losses(out)
    assert sorted(got) == [3, 4] and all(abs(got[s] - expected[s]) < 1e-5 for s in got), (got, expected)


def test_resume_refuses_other_batch_shape(corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "r"
    run(corpus, tokenizer_dir, out, max_steps=2, save_steps=2)
    capsys.readouterr()
    _exits_2(capsys, pretrain_args(corpus, tokenizer_dir, out, max_steps=4, resume="auto", per_device_train_batch_size=8),
             r"checkpoint-2 was saved with a global batch of 4 samples per step, this run's is 8: resume with --global_batch_size 4")
    _exits_2(capsys, pretrain_args(corpus, tokenizer_dir, out, model_name_or_path=out / "final"),
             r"pass exactly one of --model_preset .* or --model_name_or_path")
    _exits_2(capsys, pretrain_args(corpus, tokenizer_dir, out, resume="never"),
             r"--resume never, but .* holds checkpoints of an earlier run")


def test_torch_compile_same_losses_and_plain_state_dict(corpus, tokenizer_dir, tmp_path):
    """--torch_compile compiles the decoder layers in place: the same losses as eager (inductor's
    fused kernels reorder fp32 sums: ~1e-6), through an eval between steps (train/eval graphs),
    with gradient checkpointing, and a final/ whose keys are the model's own (no _orig_mod)."""
    from safetensors import safe_open
    import torch

    run(corpus, tokenizer_dir, tmp_path / "eager", max_steps=4, eval_steps=2, validation_split_ratio=0.1)
    run(corpus, tokenizer_dir, tmp_path / "compiled", max_steps=4, eval_steps=2, validation_split_ratio=0.1, torch_compile=True)
    run(corpus, tokenizer_dir, tmp_path / "checkpointed", max_steps=4, eval_steps=2, validation_split_ratio=0.1, torch_compile=True,
        gradient_checkpointing=True)
    eager, compiled = read_losses(tmp_path / "eager"), read_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() == {1, 2, 3, 4}
    assert all(abs(eager[s] - compiled[s]) < 1e-4 for s in eager), (eager, compiled)
    checkpointed = read_losses(tmp_path / "checkpointed")
    assert checkpointed.keys() == eager.keys() and all(abs(eager[s] - checkpointed[s]) < 1e-4 for s in eager)
    plan = json.loads((tmp_path / "compiled" / "plan.json").read_text())
    assert plan["compiled_layers"] == 4  # the tiny preset's layers
    assert json.loads((tmp_path / "eager" / "plan.json").read_text())["compiled_layers"] == 0
    evals = [json.loads(l)["eval_loss"] for path in ("eager", "compiled")
             for l in (tmp_path / path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert len(evals) == 4 and abs(evals[0] - evals[2]) < 1e-4 and abs(evals[1] - evals[3]) < 1e-4
    with safe_open(str(tmp_path / "compiled" / "final" / "model.safetensors"), "pt") as saved, \
            safe_open(str(tmp_path / "eager" / "final" / "model.safetensors"), "pt") as reference:
        assert set(saved.keys()) == set(reference.keys())
        assert not any("_orig_mod" in k for k in saved.keys())
        for key in reference.keys():
            torch.testing.assert_close(saved.get_tensor(key), reference.get_tensor(key), atol=1e-4, rtol=1e-3)
