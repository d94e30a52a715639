"""Every shipped config file loads with the loader of the tool that reads it."""


import pytest

from conftest import REPO
from trainers.config import PretrainConfig, SFTConfig, parse_config, parse_run
from trainers.errors import UsageError
from trainers.ds_config import TEMPLATES, DeepSpeedSettings, build, fill_ds_config, load_ds_json, template, template_name

DS_FILES = sorted((REPO / "ds_configs").glob("*.json"))
ACCELERATE_FILES = sorted((REPO / "accelerate_configs").glob("*.yaml"))
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
MODEL_SHAPES = sorted((REPO / "configs" / "models").glob("*.json"))


def settings(**kw):
    base = dict(micro_batch=4, accumulation=2, world_size=1, max_grad_norm=1.0, precision="bf16",
                zero_stage="auto", offload="auto", sources={}, hidden_size=896)
    return DeepSpeedSettings(**{**base, **kw})


def test_every_kind_is_shipped():
    assert {p.name for p in DS_FILES} == {template_name(stage, offload) for stage, offload in TEMPLATES}
    assert {p.stem for p in ACCELERATE_FILES} >= {"single_gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"}


@pytest.mark.parametrize("stage,offload", TEMPLATES)
def test_shipped_ds_configs_are_the_templates_trainrig_builds_from(stage, offload):
    """The files a user passes with --deepspeed ds_configs/... and the JSON trainrig launch writes or
    the runtime builds for --zero_stage/--offload come from one template; filled, they are equal."""
    path = REPO / "ds_configs" / template_name(stage, offload)
    assert load_ds_json(path) == template(stage, offload)
    filled = fill_ds_config(load_ds_json(path), settings(), str(path))
    assert filled == build(stage, offload, settings(zero_stage=str(stage), offload=offload))
    zero = filled["zero_optimization"]
    if stage:
        assert zero["reduce_bucket_size"] == 896 * 896
        assert filled["data_types"] == {"grad_accum_dtype": "fp32"}  # bf16 accumulates in fp32 under ZeRO, as DDP does
    else:
        assert "data_types" not in filled  # DeepSpeed 0.19 has no fp32 accumulation without ZeRO
    if stage == 3:
        assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (int(0.9 * 896 * 896), 8960)
    assert "data_types" not in fill_ds_config(template(stage, offload), settings(precision="fp32"), "x")


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_ds_config_loads_in_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = fill_ds_config(load_ds_json(path), settings(), str(path))
    assert "auto" not in str(filled)
    ds = DeepSpeedConfig(filled)          # DeepSpeed's own parser and batch checks
    assert ds.train_micro_batch_size_per_gpu == 4 and ds.gradient_accumulation_steps == 2
    assert ds.gradient_clipping == 1.0 and ds.bfloat16_config.enabled
    assert ds.zero_optimization_stage == int(path.stem[4])
    assert ds.grad_accum_dtype == ("fp32" if int(path.stem[4]) else None)


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_ds_config_loads_in_accelerate(path):
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == int(path.stem[4])


def test_ds_conflict_names_both_values():
    with pytest.raises(UsageError, match=r"gradient_clipping=0\.5 contradicts --max_grad_norm=1\.0"):
        fill_ds_config({"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}, settings(), "x.json")
    with pytest.raises(UsageError, match=r"zero_optimization\.stage=3 contradicts --zero_stage=2"):
        fill_ds_config({"zero_optimization": {"stage": 3}}, settings(zero_stage="2"), "x.json")
    with pytest.raises(UsageError, match=r"remove the \"optimizer\" section"):
        fill_ds_config({"optimizer": {"type": "AdamW"}}, settings(), "x.json")


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        assert (REPO / ds_file).is_file()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_parse(path):
    stage = SFTConfig if path.name.startswith("sft") else PretrainConfig
    cfg = parse_config(stage, ["--config", str(path)], prog="t")
    assert cfg.run.output_dir.startswith("outputs/")


@pytest.mark.parametrize("path", MODEL_SHAPES, ids=lambda p: p.name)
def test_model_shapes_build_on_meta(path):
    import json

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**{"vocab_size": 151936, **json.loads(path.read_text())})  # presets take it from the tokenizer
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    expected = {"0.5b": 494e6, "1.5b": 1.54e9, "qwen2.5-0.5b": 494e6, "qwen2.5-7b": 7.62e9, "qwen2.5-14b": 14.7e9, "qwen2.5-32b": 32.5e9}.get(path.stem)   # Qwen2.5 model cards
    if expected:
        assert abs(n - expected) / expected < 0.02, n


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("profile", ["rtx5090", "4x4090"])
def test_recipes_plan_and_fit_the_target_machines(path, profile):
    """Each GPU recipe fits a 5090 and a 4x4090 box as the planner sizes it (models not downloaded
    here: planned with the shipped shape of the same size)."""
    from launch.plan import make_plan

    if "tiny" in path.name:
        return  # the CPU recipes
    stage = "sft" if path.name.startswith("sft") else "pretrain"
    argv = ["--config", str(path), "--hardware", profile]
    from launch.planner.memory import shipped_shape_names

    shape = next((name for name in shipped_shape_names() if f"{name}." in path.name), None)
    if shape:
        argv += ["--model_name_or_path", shape]
    run = parse_run(SFTConfig if stage == "sft" else PretrainConfig, argv, prog="t")
    cfg = run.cfg
    result = make_plan(run, stage, local_only=False, plan_everything=True)
    assert result.fits, result.notes
    assert result.global_batch == cfg.batch.global_batch_size
