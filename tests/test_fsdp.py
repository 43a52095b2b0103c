"""FSDP-QLoRA on CPU: 2 gloo processes shard the tiny NF4 model (finllm_pl/fsdp.py) and must train, resume, export,
validate and label exactly as 1 process does at the same effective batch; plus the pieces in isolation (the decoder
layer class found for any architecture, the units and the gathered adapter on a 1-process group, the backend plan,
the refused options).

As in test_ddp.py, 2-process runs go through the real command line in a subprocess with its own process group,
killed on timeout (an FSDP collective that one rank skips hangs the other), and 1-process references run in this
process. Comparable runs: 2 ranks x accumulation 2 train optimizer step k on the global batches of 1 rank x
accumulation 4 (the sampler deals global batches r, r+W, ...); LoRA dropout off. The 2-process run takes the fast
backend's kernels only (fsdp.plan rules out the rest), the 1-process one its static step, sparse head, ...: the same
math in another order, equal up to float32 rounding.

The default run (~50 s here: one 2-process fit, its 1-process reference, the unit tests) covers fit, export,
validation and checkpoints; `-m slow` adds (each ~20-60 s more): the mid-window resume on 2 processes, predict
(scores, generate, and a rank with nothing to label), validate from a checkpoint, quantization none with gradient
checkpointing.
"""

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from finllm_pl import fsdp
from finllm_pl import model as hf
from finllm_pl.__main__ import cli_main
from finllm_pl.errors import ConfigError, ModelError
from test_ddp import (FIT, PREDICT, VALIDATE, _inside, _ok, _one, _report, _same_metrics, adapter_tensors, losses_to,
                      run_cli, step_log)

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = ["--trainer.devices", "2", "--trainer.strategy", "fsdp_qlora"]
STEPS = 3  # 2 ranks x 6 micro-batches, accumulation 2 (lr: 0.005, 0.01, 0)
TWO = [*FIT, *FSDP2, "--model.accumulate_grad_batches", "2", "--trainer.limit_train_batches", str(2 * STEPS),
       "--trainer.logger", "false", "--checkpoint.every_n_train_steps", "1"]
ONE = [*FIT, "--model.accumulate_grad_batches", "4", "--trainer.limit_train_batches", str(4 * STEPS),
       "--trainer.logger", "false", "--checkpoint.every_n_train_steps", "1"]


def _callback(cls: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": cls, "init_args": init_args})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """A 2-process FSDP fit that also saves mid-window (after micro-batch 2: the first of step 2's window), and
    the 1-process reference."""
    d = tmp_path_factory.mktemp("fsdp")
    shutil.copytree(ROOT / "data", d / "data")
    shutil.copytree(ROOT / "configs", d / "configs")
    saves = d / "saves.log"
    fit2 = run_cli(["fit", *TWO, "--checkpoint.dirpath", "ck2", "--trainer.default_root_dir", "run2",
                    *losses_to("losses2.json"), _callback("ddp_probe.SaveAt", batch=2, path="mid.ckpt"),
                    "--trainer.plugins", json.dumps({"class_path": "ddp_probe.RecordingCheckpointIO"})],
                   d, {"FINLLM_TEST_SAVES": str(saves)})
    with _inside(d):
        cli = cli_main([*ONE, "--checkpoint.dirpath", "ck1", "--trainer.default_root_dir", "run1",
                        *losses_to("losses1.json")], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
    return {"dir": d, "fit2": fit2, "saves": saves}


@pytest.fixture(scope="module")
def resumed(runs):
    """The 2-process FSDP fit resumed from its mid-window checkpoint, on 2 processes."""
    _ok(runs["fit2"])
    return run_cli(["fit", *TWO, "--checkpoint.dirpath", "ckb", "--trainer.default_root_dir", "runb",
                    *losses_to("losses_b.json"), "--ckpt_path", "mid.ckpt"], runs["dir"])


# -- fit ------------------------------------------------------------------------------------------------------------
def test_fsdp_fit_matches_one_process_at_the_same_effective_batch(runs):
    d = runs["dir"]
    out = _ok(runs["fit2"])
    assert "kernels proved equal to the plain path" in out and "lora_groups switched off" in out
    one, two = step_log(d / "losses1.json"), step_log(d / "losses2.json")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1)), (one, two)
    # grad_norm is the global norm: a rank's own shards' norm would be ~1/sqrt(2) of it, and clipping (at 1.0 here,
    # the norm is ~2.5) would then scale the steps differently on each rank
    for step in one:
        for k in ("loss", "grad_norm", "lr"):
            assert two[step][k] == pytest.approx(one[step][k], rel=1e-5), f"step {step} {k}: {two[step]} vs {one[step]}"
    assert one[STEPS]["loss"] < one[1]["loss"] - 0.5  # it trained

    a, b = torch.load(d / "ck1/last.ckpt", weights_only=True), torch.load(d / "ck2/last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys() and a["state_dict"]  # the one-GPU names, whole tensors
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    # the optimizer state whole, in torch's own format (as one process saves it): the same keys, the same moments
    oa, ob = a["optimizer_states"][0], b["optimizer_states"][0]
    assert oa["param_groups"][0]["params"] == ob["param_groups"][0]["params"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, s in oa["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob["state"][i][k], s[k], rtol=1e-3, atol=1e-7, msg=f"{i} {k}")
    assert b["finllm"]["world_size"] == 2 and b["global_step"] == STEPS

    # saved once, by rank 0: 3 steps x (step file, last.ckpt) and the mid-window one
    saves = [line.split() for line in runs["saves"].read_text().splitlines()]
    assert {rank for rank, _, _ in saves} == {"0"} and len(saves) == 7, saves
    assert sorted(p.name for p in (d / "ck2").iterdir()) == ["adapter", "last.ckpt", "step=000001.ckpt",
                                                              "step=000002.ckpt", "step=000003.ckpt"]


def test_fsdp_export_is_the_checkpoint_s_adapter_and_the_one_process_one(runs):
    from safetensors.torch import load_file

    from finllm_pl.export import main as export_main

    d = runs["dir"]
    _ok(runs["fit2"])
    exported = load_file(d / "ck2/adapter/adapter_model.safetensors")
    trained = {k.removeprefix("model.").replace(".default", ""): v
               for k, v in adapter_tensors(d / "ck2/last.ckpt").items()}
    assert exported.keys() == trained.keys() and exported
    for k, v in trained.items():
        assert torch.equal(exported[k], v), k
    reference = load_file(d / "ck1/adapter/adapter_model.safetensors")
    assert reference.keys() == exported.keys()
    for k in reference:
        torch.testing.assert_close(exported[k], reference[k], rtol=1e-4, atol=2e-5, msg=k)
    # `export` of the FSDP checkpoint (no Lightning, no processes) writes the very adapter fit exported
    with _inside(d):
        assert export_main(["ck2/last.ckpt", "--out", "exported"]) in (0, None)
    again = load_file(d / "exported/adapter_model.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)
    assert json.loads((d / "ck2/adapter/adapter_config.json").read_text())["r"] == 8


def test_fsdp_fit_s_validation_equals_one_process_validate(runs):
    d = runs["dir"]
    _ok(runs["fit2"])
    # fit's end-of-epoch validation under FSDP (every rank in every forward: padded batches count nowhere) ran on
    # the final weights: one process validating that checkpoint gets the same metrics
    with _inside(d):
        cli_main(["validate", *VALIDATE, "--trainer.default_root_dir", "val1", "--ckpt_path", "ck2/last.ckpt"])
    _same_metrics(_report(d / "run2/validation.json"), _report(_one(d.glob("val1/eval/validate-*/validation.json"))))
    seen = [json.loads((d / f"losses2.json.val{r}").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]


# -- resume ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # (one more 2-process run, ~20 s: over the default run's ~60 s)
def test_fsdp_resume_mid_window_equals_the_uninterrupted_run(runs, resumed):
    """Saved after the first micro-batch of step 2's window: each rank's shards of the gradients (reduced over the
    ranks already, by FSDP's reduce-scatter) and its own counters; resumed on 2 processes, steps 2 and 3 and the
    final adapter are the uninterrupted run's (the Adam moments of step 1 and the data position restored too)."""
    d = runs["dir"]
    _ok(runs["fit2"])
    mid = torch.load(d / "mid.ckpt", weights_only=True)
    ranks = mid["finllm"]["window"]["ranks"]
    assert mid["global_step"] == 1 and [r["micro"] for r in ranks] == [1, 1]
    name = next(iter(ranks[0]["grads"]))
    assert "_fsdp_wrapped_module" in name and not torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
    _ok(resumed)
    a, b = step_log(d / "losses2.json"), step_log(d / "losses_b.json")
    assert sorted(b) == [2, 3]
    for step in (2, 3):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), (step, a, b)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-5), (step, a, b)
    want, got = adapter_tensors(d / "ck2/last.ckpt"), adapter_tensors(d / "ckb/last.ckpt")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_fsdp_checkpoints_resume_only_on_their_world_size_and_kind_of_strategy(runs, capsys, monkeypatch):
    d = runs["dir"]
    _ok(runs["fit2"])
    monkeypatch.chdir(d)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", *ONE, "--checkpoint.dirpath", "ck_resume", "--ckpt_path", "ck2/last.ckpt"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "saved by a run on 2 process(es), resumed on 1" in err[0], err
    # a mid-window checkpoint holds gradient shards by their sharded names: an unsharded run would not find them
    meta = torch.load(d / "mid.ckpt", weights_only=True)["finllm"]
    with pytest.raises(ModelError, match="saved mid accumulation window by a sharded"):
        fsdp.check_resume("mid.ckpt", meta, torch.nn.Linear(2, 2))
    fsdp.check_resume("mid.ckpt", meta, fsdp.ShardedModel.__new__(fsdp.ShardedModel))  # (isinstance only)
    unsharded = {"window": {"ranks": [{"grads": {"base_model.model.x.lora_A.default.weight": torch.zeros(1)}}]}}
    with pytest.raises(ModelError, match="by an unsharded .* resumed by a sharded"):
        fsdp.check_resume("ddp.ckpt", unsharded, fsdp.ShardedModel.__new__(fsdp.ShardedModel))
    fsdp.check_resume("last.ckpt", {"world_size": 2}, torch.nn.Linear(2, 2))  # between steps: any strategy


# -- the pieces, without processes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,want", [("llama", "LlamaDecoderLayer"), ("gemma2", "Gemma2DecoderLayer"),
                                       ("phi3", "Phi3DecoderLayer"), ("cohere", "CohereDecoderLayer")])
def test_the_decoder_layer_class_comes_from_the_model(arch, want, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=64, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2,
                                  **({} if arch == "phi3" else {"head_dim": 8}))
    model = hf.add_lora(AutoModelForCausalLM.from_config(config), 2, 4, 0.0, ["o_proj"])
    layer = type(model.get_base_model().model.layers[0])
    assert fsdp.decoder_layer_classes(model) == {layer} and layer.__name__ == want
    # without transformers' _no_split_modules: the class of the longest list of alike modules
    monkeypatch.setattr(type(model.get_base_model()), "_no_split_modules", None)
    assert fsdp.decoder_layer_classes(model) == {layer}
    with pytest.raises(ModelError, match="no decoder layers"):
        fsdp.decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.fixture
def one_process_group():
    """A 1-process gloo group in this process (FSDP needs one), destroyed after the test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny_lora(tiny_dir, storage):
    torch.manual_seed(0)
    model = hf.build(str(tiny_dir), "nf4", torch.float32, torch.device("cpu"), None, False,
                     {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                     seed=1, quant_storage=storage)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_the_sharded_model_s_units_adapter_and_norm(tiny_dir, one_process_group):
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    plain = _tiny_lora(tiny_dir, torch.float32)
    want_logits = plain(input_ids=ids).logits
    want = {n: p.detach().clone() for n, p in plain.named_parameters() if p.requires_grad}
    model = fsdp.ShardedModel.wrap(_tiny_lora(tiny_dir, torch.float32), torch.device("cpu"))
    # a unit per decoder layer (2) and per LoRA linear (2 layers x 3 targets x A, B); the rest in the root
    assert fsdp.describe_units(model) == {"units": 1 + 2 + 12, "lora": 12, "layers": 2}
    assert fsdp.trainable_shapes(model) == {n: p.shape for n, p in want.items()}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want_logits)  # 4-bit weights stored as fp32: same numbers
    got = model.gather_adapter()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ModelError, match="gathers at the end of fit"):
        model.save_pretrained("nowhere")
    new = {k: torch.randn_like(v) for k, v in want.items()}
    model.load_adapter_(new)
    assert all(torch.equal(model.gather_adapter()[k], new[k]) for k in new)
    # the norm: of every gradient (one rank here: the all-reduce adds nothing)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) == 12
    unsharded = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
    torch.testing.assert_close(fsdp.grad_norm(grads, model), unsharded, rtol=1e-6, atol=0)
    # stored as uint8 (the default), a layer's 4-bit weights and its fp32 norms cannot be one flat parameter
    with pytest.raises(ModelError, match="FSDP cannot shard this model"):
        fsdp.ShardedModel.wrap(_tiny_lora(tiny_dir, torch.uint8), torch.device("cpu"))


def test_the_fast_backend_under_fsdp_keeps_only_what_runs_inside_units(tiny_dir):
    from finllm_pl.backend import RunShape

    shape = RunShape(str(tiny_dir), "nf4", torch.float32, torch.device("cpu"), 4, 8, ["q_proj", "v_proj"], None,
                     False, 64, training=True)
    decision = fsdp.plan("fast", shape, ["lora_groups"], world_size=1)
    assert decision.on == ["kernels"]  # (folded_attention: CUDA only)
    assert decision.off["lora_groups"] == "model.fast_skip names it"
    for c in set(fsdp.NOT_SHARDED) - {"lora_groups"}:
        assert decision.off[c].startswith("fsdp_qlora shards the model: "), c
    assert decision.off["folded_attention"] == "no CUDA device"
    assert fsdp.plan("plain", shape).on == []


def _hp(**changes):
    hp = {"merge_for_labeling": False, "use_dora": False, "chunk_tokens": None, "quantization": "nf4"}
    return {**hp, **changes}


def test_what_cannot_work_under_fsdp_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    for kwargs, key in [({"cpu_offload": True}, "cpu_offload"), ({"sharding_strategy": "NO_SHARD"}, "ddp"),
                        ({"sharding_strategy": "HYBRID_SHARD"}, "sharding_strategy"),
                        ({"sharding_strategy": "shard_grad_op"}, "bitsandbytes puts a new weight"),
                        ({"mixed_precision": object()}, "mixed_precision"),
                        ({"auto_wrap_policy": {torch.nn.Linear}}, "auto_wrap_policy"),
                        ({"activation_checkpointing_policy": {torch.nn.Linear}}, "gradient_checkpointing"),
                        ({"state_dict_type": "sharded"}, "state_dict_type"), ({"use_orig_params": False}, "use_orig")]:
        with pytest.raises(ConfigError, match=key):
            fsdp.QLoRAFSDPStrategy(**kwargs).check()  # (made with the Trainer, before any process starts)
    strategy = fsdp.QLoRAFSDPStrategy(sharding_strategy="full_shard")
    strategy.check()
    run = types.SimpleNamespace(strategy=strategy, precision="32-true")
    assert fsdp.strategy_of(run, _hp(), torch.float32) is strategy
    assert fsdp.strategy_of(types.SimpleNamespace(strategy=DDPStrategy(), precision="32-true"), _hp(),
                            torch.float32) is None
    with pytest.raises(ConfigError, match="use --trainer.strategy fsdp_qlora"):
        fsdp.strategy_of(types.SimpleNamespace(strategy=FSDPStrategy(), precision="32-true"), _hp(), torch.float32)
    for hp, key in [(_hp(merge_for_labeling=True), "merge_for_labeling"), (_hp(use_dora=True), "use_dora"),
                    (_hp(chunk_tokens=512), "chunk_tokens")]:
        with pytest.raises(ConfigError, match=key):
            fsdp.strategy_of(run, hp, torch.float32)
    with pytest.raises(ConfigError, match="trainer.precision=32-true casts every parameter"):
        fsdp.strategy_of(run, _hp(), torch.bfloat16)
    assert fsdp.strategy_of(types.SimpleNamespace(strategy=strategy, precision="bf16-mixed"), _hp(), torch.bfloat16)
    # through the command line: one line, exit 2, before anything loads
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", "configs/smoke.yaml", "--trainer.strategy", json.dumps(
            {"class_path": "finllm_pl.fsdp.QLoRAFSDPStrategy", "init_args": {"sharding_strategy": "NO_SHARD"}})])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: trainer.strategy.sharding_strategy=NO_SHARD: fsdp_qlora takes FULL_SHARD (that is DDP: "
                   "use --trainer.strategy ddp)"], err


# -- slow: predict, validate from a checkpoint, quantization none --------------------------------------------------
@pytest.mark.slow
def test_fsdp_predict_and_generate_write_the_one_process_files(runs):
    d = runs["dir"]
    _ok(runs["fit2"])
    head = d / "data/head.jsonl"  # one chunk: rank 1 labels nothing, and takes part in rank 0's forwards
    head.write_text("".join(open(d / "data/sample.jsonl").readlines()[:30]))
    generate = ["--model.predict_mode", "generate", "--model.max_new_tokens", "4"]
    for mode, extra in (("score", []), ("generate", generate), ("head", ["--data.predict_path", "data/head.jsonl"])):
        _ok(run_cli(["predict", *PREDICT, *FSDP2, "--ckpt_path", "ck2/last.ckpt", *extra, "--data.predict_output",
                     f"{mode}2.jsonl"], d))
        with _inside(d):
            cli_main(["predict", *PREDICT, "--ckpt_path", "ck2/last.ckpt", *extra, "--data.predict_output",
                      f"{mode}1.jsonl"])
        one = [json.loads(line) for line in open(d / f"{mode}1.jsonl")]
        two = [json.loads(line) for line in open(d / f"{mode}2.jsonl")]
        assert len(one) == len(two) == (30 if mode == "head" else 240)
        assert [r["id"] for r in two] == [r["id"] for r in one]
        assert [r["label"] for r in two] == [r["label"] for r in one]
        if mode == "generate":
            assert [r["generated"] for r in two] == [r["generated"] for r in one]
        else:
            assert max(abs(x["probs"][k] - y["probs"][k]) for x, y in zip(one, two) for k in x["probs"]) <= 1e-5


@pytest.mark.slow
def test_fsdp_validate_from_a_checkpoint_equals_one_process(runs):
    d = runs["dir"]
    _ok(runs["fit2"])
    _ok(run_cli(["validate", *VALIDATE, *FSDP2, "--trainer.default_root_dir", "val2", "--ckpt_path",
                 "ck2/step=000002.ckpt"], d))
    with _inside(d):
        cli_main(["validate", *VALIDATE, "--trainer.default_root_dir", "val1b", "--ckpt_path", "ck2/step=000002.ckpt"])
    _same_metrics(_report(_one(d.glob("val2/eval/validate-*/validation.json"))),
                  _report(_one(d.glob("val1b/eval/validate-*/validation.json"))))


@pytest.mark.slow
def test_fsdp_without_quantization_and_with_gradient_checkpointing_matches_one_process(runs):
    d = runs["dir"]
    extra = ["--model.quantization", "none", "--model.gradient_checkpointing", "true"]
    # (through the documented config file this time: configs/fsdp.yaml after the model's config)
    by_config = [*FIT, "--config", "configs/fsdp.yaml", "--trainer.devices", "2", *TWO[len(FIT) + len(FSDP2):]]
    _ok(run_cli(["fit", *by_config, *extra, "--checkpoint.dirpath", "cknone2", *losses_to("none2.json")], d))
    with _inside(d):
        cli = cli_main([*ONE, *extra, "--checkpoint.dirpath", "cknone1", *losses_to("none1.json")], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
    one, two = step_log(d / "none1.json"), step_log(d / "none2.json")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for k in ("loss", "grad_norm"):
            assert two[step][k] == pytest.approx(one[step][k], rel=1e-5), (step, k, one, two)
    a, b = adapter_tensors(d / "cknone1/last.ckpt"), adapter_tensors(d / "cknone2/last.ckpt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
