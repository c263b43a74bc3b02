"""`rlsubnet train {grpo,dpo,sft} --model DIR` on a tiny Qwen2 model built from a config, with its tokenizer saved
beside it, a JSONL dataset and a reward function from a test module (offline, a few steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

from rlsubnet.checkpoint import open_checkpoint  # noqa: E402
from rlsubnet.cli.main import main  # noqa: E402
from rlsubnet.masks import Mask, random_mask  # noqa: E402

PROMPTS = [f"{a}+{b}=" for a in range(6) for b in range(6)]
REWARDS = Path(__file__).with_name("cli_rewards.py")


def _save_qwen(folder, tokenizer, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer):
    """A bf16 Qwen2-style model folder (weights, config, tokenizer), as a downloaded model would be."""
    return _save_qwen(tmp_path_factory.mktemp("qwen") / "model", tokenizer, torch.bfloat16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = {
        "grpo": [{"prompt": p, "answer": str(eval(p[:-1]))} for p in PROMPTS],
        "dpo": [{"prompt": p, "chosen": str(eval(p[:-1])), "rejected": "0"} for p in PROMPTS],
        "sft": [{"prompt": p, "completion": str(eval(p[:-1]))} for p in PROMPTS],
    }
    for name, rs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return d


def _mask(model_dir, path, density=0.3):
    ck = open_checkpoint(model_dir)
    m = random_mask({n: ck.infos[n].shape for n in ck.names()}, density=density, seed=2)
    t = {n: m.tensor(n) for n in m.names()}
    for n in t:
        if "norm" in n:
            t[n][:] = False  # whole tensors outside the mask, as in RL masks
    return Mask.from_bool(t, {"kind": "changed", "atol": 1e-5, "dtype": "bf16"}).save(path)


def _train(algorithm, model_dir, out, *args):
    return main(["train", algorithm, "--model", str(model_dir), "--out", str(out), "--lr", "1e-2", "--steps", "2",
                 "--batch-size", "4", "--weight-decay", "0.1", "-q", *args])


def _check_output(model_dir, out, mask_path):
    """Frozen entries of the saved model bit-identical to the input's; most trainable ones moved."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "model"), local_files_only=True)  # an HF folder that loads
    mask = Mask.load(mask_path)
    before, after = open_checkpoint(model_dir), open_checkpoint(out / "model")
    assert after.names() == before.names()
    frozen_moved = trained_moved = 0
    for name in before.names():
        a, b = before.read(name), after.read(name)
        assert a.dtype == b.dtype == torch.bfloat16  # the input's dtype, not fp32 masters
        differs = a.view(torch.int16) != b.view(torch.int16)
        t = mask.tensor(name)
        frozen_moved += int((differs & ~t).sum())
        trained_moved += int((differs & t).sum())
    assert frozen_moved == 0 and trained_moved > 0.3 * mask.changed, (frozen_moved, trained_moved, mask.changed)
    record = json.loads((out / "train.json").read_text())
    assert record["check"]["frozen_entries_moved"] == 0 and record["check"]["frozen_entries_checked"] > 0
    return record


def test_grpo_with_a_reward_from_a_test_module(qwen, data, tmp_path, capsys):
    mask = _mask(qwen, tmp_path / "m.safetensors")
    out = tmp_path / "grpo"
    rc = _train("grpo", qwen, out, "--dataset", str(data / "grpo.jsonl"), "--reward", "train.cli_rewards:count_ones",
                "--mask", str(mask), "--num-generations", "4", "--max-completion-length", "3")
    text = capsys.readouterr()
    assert rc == 0, text.err
    record = _check_output(qwen, out, mask)
    assert record["optimizer_state"] == "sparse" and record["reward"] == "train.cli_rewards:count_ones"
    opt = record["optimizer"]
    assert opt["steps"] == 2 and opt["order"] == "clip the full gradient, then mask"
    assert opt["masters"].startswith("fp32 masters of the trainable entries")
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in logs if "grad_norm" in r][-1] == pytest.approx(opt["last_grad_norm"])
    assert "0 of" in text.out and "entries moved" in text.out


def test_dpo_with_gradient_accumulation(qwen, data, tmp_path):
    mask = _mask(qwen, tmp_path / "m.safetensors")
    out = tmp_path / "dpo"
    assert _train("dpo", qwen, out, "--dataset", str(data / "dpo.jsonl"), "--mask", str(mask), "--grad-accum", "2",
                  "--batch-size", "2") == 0
    record = _check_output(qwen, out, mask)
    assert record["optimizer"]["accumulation_steps"] == 2 and record["dataset"]["rows"] == len(PROMPTS)


def test_sft(qwen, data, tmp_path):
    mask = _mask(qwen, tmp_path / "m.safetensors")
    out = tmp_path / "sft"
    assert _train("sft", qwen, out, "--dataset", str(data / "sft.jsonl"), "--mask", str(mask)) == 0
    _check_output(qwen, out, mask)


def test_sparse_and_dense_state_agree_bit_for_bit_on_fp32_weights(tokenizer, data, tmp_path):
    """Where the weights are their own masters (fp32), sparse and dense state train the same bits."""
    model_dir = _save_qwen(tmp_path / "fp32", tokenizer, torch.float32)
    mask = _mask(model_dir, tmp_path / "m.safetensors")
    outs = {}
    for state in ("sparse", "dense"):
        outs[state] = tmp_path / state
        assert _train("sft", model_dir, outs[state], "--dataset", str(data / "sft.jsonl"), "--mask", str(mask),
                      "--optimizer-state", state) == 0
    a, b = open_checkpoint(outs["sparse"] / "model"), open_checkpoint(outs["dense"] / "model")
    for name in a.names():
        assert torch.equal(a.read(name).view(torch.int32), b.read(name).view(torch.int32)), name
    base = open_checkpoint(model_dir)
    assert any(not torch.equal(base.read(n), a.read(n)) for n in a.names())


def test_dense_state_takes_any_torch_optimizer(qwen, data, tmp_path):
    mask = _mask(qwen, tmp_path / "m.safetensors")
    out = tmp_path / "adagrad"
    assert _train("sft", qwen, out, "--dataset", str(data / "sft.jsonl"), "--mask", str(mask), "--optim", "adagrad",
                  "--optimizer-state", "dense") == 0
    record = _check_output(qwen, out, mask)
    assert record["optimizer"]["optimizer"] == "Adagrad" and record["optimizer"]["mode"].startswith("strict")


def test_lab_task_rows_without_a_dataset(qwen, tmp_path):
    out = tmp_path / "sft-task"
    assert _train("sft", qwen, out, "--task", "add", "--steps", "1") == 0
    record = json.loads((out / "train.json").read_text())
    assert record["dataset"]["task"] == "add" and record["mask"] is None and record["steps_done"] == 1


def _bad_mask_shape(model_dir, path):
    ck = open_checkpoint(model_dir)
    t = {n: torch.ones(ck.infos[n].shape, dtype=torch.bool) for n in ck.names()}
    name = next(n for n in t if n.endswith("up_proj.weight"))
    t[name] = torch.ones(3, 3, dtype=torch.bool)
    t["model.extra.weight"] = torch.ones(2, dtype=torch.bool)
    return Mask.from_bool(t).save(path)


@pytest.mark.parametrize("case", ["shape", "density0", "optim", "column", "import", "signature", "kwargs",
                                  "not_callable", "tokenizer", "no_model", "dataset_and_task", "strict_sparse"])
def test_bad_input_one_line_exit_2_nothing_written(case, qwen, data, tmp_path, capsys):
    out = tmp_path / "out"
    algo, extra, model_dir = "sft", ["--dataset", str(data / "sft.jsonl")], qwen
    if case == "shape":
        extra += ["--mask", str(_bad_mask_shape(qwen, tmp_path / "m.safetensors"))]
        expect = ["does not fit this model", "mask tensors the model does not have: model.extra.weight",
                  "up_proj.weight [3, 3] in the mask vs [64, 32]"]
    elif case == "density0":
        ck = open_checkpoint(qwen)
        empty = Mask.full({n: ck.infos[n].shape for n in ck.names()}, False).save(tmp_path / "z.safetensors")
        extra += ["--mask", str(empty)]
        expect = ["density 0"]
    elif case == "optim":
        extra += ["--optim", "adagrad"]
        expect = ["--optim 'adagrad' is not supported with --optimizer-state sparse", "supported: adamw, adam, sgd",
                  "--optimizer-state dense"]
    elif case == "column":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "1+1=", "completion": "2"}\n\n{"prompt": "1+2="}\n')
        extra = ["--dataset", str(bad)]
        expect = [f"--dataset {bad}: line 3 has no 'completion' column (sft needs prompt, completion)"]
    elif case in ("import", "signature", "kwargs", "not_callable"):
        algo = "grpo"
        spec = {"import": "train.no_such_module:f", "signature": f"{REWARDS}:positional_only",
                "kwargs": "train.cli_rewards:no_kwargs", "not_callable": "train.cli_rewards:NOT_A_FUNCTION"}[case]
        extra = ["--dataset", str(data / "grpo.jsonl"), "--reward", spec]
        expect = {"import": ["cannot import train.no_such_module"], "signature": ["signature positional_only"],
                  "kwargs": ["does not accept answer, completion_ids"], "not_callable": ["not a function"]}[case]
    elif case == "tokenizer":
        model_dir = tmp_path / "no-tok"
        model_dir.mkdir()
        for f in ("config.json", "model.safetensors"):
            (model_dir / f).write_bytes((qwen / f).read_bytes())
        expect = [f"--model {model_dir}: no tokenizer in the folder"]
    elif case == "no_model":
        rc = main(["train", "sft", "--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and "give --model DIR" in err and len(err.strip().splitlines()) == 1
        return
    elif case == "dataset_and_task":
        extra += ["--task", "sub"]
        expect = ["--dataset and --task"]
    else:
        extra += ["--strict"]
        expect = ["--strict applies to --optimizer-state dense"]
    rc = _train(algo, model_dir, out, *extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("rlsubnet: error:"), err
    for e in expect:
        assert e in err, err
    assert not out.exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # nor its temporaries
