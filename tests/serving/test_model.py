"""Our Llama against Hugging Face transformers on the same random weights (a reference no one here wrote)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from memserve import (
    Engine,
    EngineConfig,
    LlamaModel,
    ModelConfig,
    ModelConfigError,
    SamplingParams,
    load_pretrained,
    preset,
)
from memserve.model import Linear, rope_inv_freq

from ..hf_models import SMALL_HF, tiny_hf
from .conftest import make_prompts, run

transformers = pytest.importorskip("transformers")


def save_hf(tmp_path: Path, kind: str = "llama", **overrides: Any) -> Any:
    """Build, randomise and save a tiny HF model; returns it (eval mode, float32)."""
    model = tiny_hf(kind, **overrides)
    model.save_pretrained(tmp_path)
    return model


CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {  # transformers 4's keys: 5 takes them too (and saves them as its rope_parameters)
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
            "max_position_embeddings": 1024,
        },
    ),
    "qwen2-bias": ("qwen2", {"tie_word_embeddings": False}),
}


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(tmp_path: Path, case: str, pack: bool) -> None:
    kind, overrides = CASES[case]
    hf = save_hf(tmp_path, kind, **overrides)
    ours = load_pretrained(tmp_path)
    prompts = make_prompts([7, 33, 90], vocab=SMALL_HF["vocab_size"], seed=3)
    config = EngineConfig(block_size=8, device_blocks=64, host_blocks=0, caching=False, pack_weights=pack)
    engine = Engine(ours, config)
    assert (ours.lm_head._packed is not None) == (pack and ours.lm_head.weight.device.type == "cpu")
    steps = 12
    tokens, logits = run(engine, prompts, SamplingParams(max_tokens=steps, ignore_eos=True, return_logits=True))
    for prompt, got_tokens, got_logits in zip(prompts, tokens, logits):
        seq = torch.tensor([prompt + got_tokens])
        with torch.no_grad():
            ref = hf(seq).logits[0, len(prompt) - 1 : -1]  # the logits that chose each generated token
        rel = (got_logits - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert rel.max().item() < 1e-4, (case, rel.max().item())
        assert ref.argmax(-1).tolist() == got_tokens  # HF's greedy choice at every step
    # without logits, greedy picks go through the int8 screen (packed, on a CPU with VNNI): the same tokens
    picked, _ = run(engine, prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
    assert picked == tokens
    engine.close()


def test_packed_weights_follow_an_in_place_change(tmp_path: Path) -> None:
    """A weight written in place (as loading a checkpoint does) is what the next step multiplies by."""
    save_hf(tmp_path)
    ours = load_pretrained(tmp_path)
    prompt = make_prompts([12], vocab=SMALL_HF["vocab_size"], seed=4)[0]
    params = SamplingParams(max_tokens=1, ignore_eos=True, return_logits=True)
    engine = Engine(ours, EngineConfig(block_size=4, device_blocks=64, host_blocks=0, caching=False))
    before = run(engine, [prompt], params)[1][0]
    with torch.no_grad():
        ours.lm_head.weight.mul_(-1.0)
    after = run(engine, [prompt], params)[1][0]
    torch.testing.assert_close(after, -before, rtol=1e-5, atol=1e-5)
    engine.close()


def test_warm_up_runs_every_step_size_on_each_packed_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine sets up each linear shape for every step of up to ``warm_up_tokens`` tokens, and the
    vocabulary screen for every batch up to ``max_running``, before its first request."""
    model = LlamaModel(preset("tiny")).init_random()
    calls: dict[str, list[int]] = {}
    forward, argmax = Linear.forward, Linear.argmax

    def record(kind: str, fn: Any) -> Any:
        def wrapped(self: Linear, x: torch.Tensor) -> Any:
            calls.setdefault(f"{kind} {self.in_features}x{self.out_features}", []).append(len(x))
            return fn(self, x)

        return wrapped

    monkeypatch.setattr(Linear, "forward", record("forward", forward))
    monkeypatch.setattr(Linear, "argmax", record("argmax", argmax))
    with pytest.raises(ValueError, match="warm_up_tokens"):
        EngineConfig(warm_up_tokens=-1)
    engine = Engine(model, EngineConfig(block_size=4, device_blocks=64, host_blocks=0, warm_up_tokens=6, max_running=3))
    c = model.config
    shapes = {
        (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
        (c.num_heads * c.head_dim, c.hidden_size),
    }
    shapes |= {(c.hidden_size, 2 * c.intermediate_size), (c.intermediate_size, c.hidden_size)}
    want = {f"forward {i}x{o}": [1, 2, 3, 4, 5, 6] for i, o in shapes}  # one layer of each shape is enough
    if model.lm_head._screen() is not None:  # where the CPU has int8 dot products
        want[f"argmax {c.hidden_size}x{c.vocab_size}"] = [1, 2, 3]
    # (the screen computes a row in full where it cannot decide: lm_head forwards, left out here)
    assert {k: v for k, v in calls.items() if k.startswith("argmax") or k in want} == want
    engine.close()
    calls.clear()
    Engine(model, EngineConfig(block_size=4, device_blocks=64, host_blocks=0, warm_up_tokens=0)).close()
    assert not calls  # 0: no warm-up


def test_hf_generate_agrees_with_engine(tmp_path: Path) -> None:
    hf = save_hf(tmp_path)
    prompt = make_prompts([21], vocab=SMALL_HF["vocab_size"], seed=5)[0]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, len(prompt) :
    ].tolist()
    engine = Engine(load_pretrained(tmp_path), EngineConfig(block_size=4, device_blocks=64, host_blocks=0))
    assert engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True)) == [want]
    engine.close()


def test_config_reads_hf_fields(tmp_path: Path) -> None:
    save_hf(tmp_path, "qwen2")
    config = ModelConfig.from_hf(tmp_path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.attention_bias and config.rms_norm_eps == 1e-6


def test_llama3_rope_scaling_matches_transformers(tmp_path: Path) -> None:
    hf = save_hf(tmp_path, **CASES["llama3-rope"][1])
    ours = rope_inv_freq(ModelConfig.from_hf(tmp_path))
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)


def test_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    save_hf(tmp_path)
    from safetensors.torch import load_file, save_file

    file = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(ModelConfigError, match="missing"):
        load_pretrained(tmp_path)


LLAMA3_LOW_ABOVE_HIGH = {
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0}
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "not a Llama"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "not supported"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding"),
        ({"use_sliding_window": True, "max_window_layers": "1"}, "sliding"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
        # malformed values: each was an untyped KeyError / ValueError / TypeError from deep inside, or was taken
        ({"hidden_size": None}, r"lacks \['hidden_size'\]"),
        ({"hidden_size": "64"}, "hidden_size must be a positive int"),
        ({"hidden_size": 64.5}, "hidden_size must be a positive int"),  # int() made it 64
        ({"num_key_value_heads": "2"}, "num_kv_heads must be a positive int"),
        ({"head_dim": -16}, "head_dim must be an int >= 0"),
        ({"rope_parameters": "default"}, "must be an object"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "positive factor"),  # a KeyError later
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": "8"}}, "positive factor"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "beta_fast": 32.0}}, "takes"),
        (LLAMA3_LOW_ABOVE_HIGH, "high_freq_factor > low_freq_factor"),  # NaN inverse frequencies
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, "rope_theta must be a positive number"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive number"),  # NaN logits
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
        ({"tie_word_embeddings": "false"}, "tie_embeddings must be a bool"),  # bool("false") tied them
        ({"attention_bias": 1}, "attention_bias must be a bool"),
        ({"layer_types": "full_attention"}, "layer_types must be a list"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    save_hf(tmp_path)
    path = tmp_path / "config.json"
    # the RoPE fields transformers 4 writes beside (5: instead of) rope_parameters: the case's alone count
    raw = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("rope_scaling", "rope_theta")}
    path.write_text(json.dumps({**raw, **change}))
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_hf(tmp_path)


def test_a_head_size_the_config_leaves_out_is_derived_as_hf_does(tmp_path: Path) -> None:
    """hidden_size // num_attention_heads, even where it does not divide (HF's projections then
    have heads x head_dim rows, fewer than hidden_size)."""
    raw = {"vocab_size": 64, "hidden_size": 100, "num_hidden_layers": 1, "num_attention_heads": 8}
    (tmp_path / "config.json").write_text(json.dumps({**raw, "num_key_value_heads": 4, "intermediate_size": 32}))
    assert ModelConfig.from_hf(tmp_path).head_dim == 12


@pytest.mark.parametrize(("text", "message"), [("[1, 2]", "a JSON list, not an object"), ("{", "cannot read")])
def test_a_config_file_that_is_no_json_object_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_hf(tmp_path)


def test_unreadable_mixed_or_non_float_weights_are_refused(tmp_path: Path) -> None:
    """Each was taken or raised untyped: a corrupt file (safetensors' own error), integer weights
    (cast to float without a word), a tensor two files hold (the later file won)."""
    from safetensors.torch import load_file, save_file

    save_hf(tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    good = file.read_bytes()
    tensors = {k: v.clone() for k, v in load_file(str(file)).items()}  # not views of the file (mapped): it changes
    file.write_bytes(good[:1000])
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_pretrained(tmp_path)
    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"].long()}, str(file))
    with pytest.raises(ModelConfigError, match=r"not floating-point=\['norm.weight'\]"):
        load_pretrained(tmp_path)
    file.write_bytes(good)
    save_file({"model.norm.weight": torch.zeros(SMALL_HF["hidden_size"])}, str(tmp_path / "z-stray.safetensors"))
    with pytest.raises(ModelConfigError, match=r"holds tensors another file also holds: \['model.norm.weight'\]"):
        load_pretrained(tmp_path)
    # with an index, as sharded checkpoints have, only the files it names are read
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(tensors, file.name)})
    )
    assert torch.equal(load_pretrained(tmp_path).norm.weight, tensors["model.norm.weight"])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(ModelConfigError, match=r"cannot read .*gone\.safetensors"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": 0}, "positive int"),
        ({"num_layers": True}, "positive int"),
        ({"vocab_size": 1.5}, "positive int"),
        ({"num_heads": 6}, "multiple of num_kv_heads"),  # over 4 KV heads
        ({"hidden_size": 100}, "multiple of num_heads"),  # 8 heads
        ({"head_dim": 63}, "even"),
        ({"rope_type": "yarn"}, "not supported"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"dtype": "float33"}, "dtype"),
        ({"dtype": "Tensor"}, "dtype"),  # a torch attribute, not a dtype
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"head_dim": -2}, "head_dim must be an int >= 0"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"tie_embeddings": 1}, "tie_embeddings must be a bool"),
        ({"init_std": -0.1}, "init_std"),
        ({"rope_scaling": (("factor", 8.0),)}, "rope_type='default' takes no rope_scaling"),  # ignored before
        ({"rope_type": "llama3", "rope_scaling": (("factor", 0.0),)}, "positive factor"),
        ({"rope_type": "llama3", "rope_scaling": "factor"}, "pairs"),
    ],
)
def test_bad_model_configs_are_refused_with_the_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        preset("default", **change)


def test_an_unknown_preset_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown model preset 'huge'; known: .*default"):
        preset("huge")


def test_the_fingerprint_names_the_weights_and_numerics_not_the_build(tmp_path: Path) -> None:
    """Instances share K/V only under one fingerprint: the same weights give the same one, however
    built (seeded twice, or saved and loaded back); another seed, checkpoint, RoPE or dtype another."""
    tiny = preset("tiny")
    first = LlamaModel(tiny).init_random()
    assert LlamaModel(tiny).init_random().pack(screen=True).fingerprint() == first.fingerprint()
    others = [
        LlamaModel(tiny.with_(seed=1)).init_random(),
        LlamaModel(tiny.with_(rope_theta=10_000.0)).init_random(),  # same weights, other K
        LlamaModel(tiny.with_(dtype="bfloat16")).init_random(),
    ]
    prints = {first.fingerprint(), *(m.fingerprint() for m in others)}
    assert len(prints) == 4
    save_hf(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert load_pretrained(tmp_path).fingerprint() == loaded.fingerprint() not in prints
    with torch.no_grad():
        loaded.layers[1].mlp.down_proj.weight.mul_(1.01)  # a fine-tune of one matrix
    assert loaded.fingerprint() != load_pretrained(tmp_path).fingerprint()
