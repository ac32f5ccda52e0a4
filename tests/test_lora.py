"""LoRA adapters in Mistral's format (lora.safetensors + params.json's `lora` section),
merged at load, against the same adapter merged by hand."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import DEVICE, DTYPE, RTOL, random_model, random_prompts, rel_error, tiny_args
from mistral import MistralError, Transformer, generate
from mistral.checkpoint import PARAMS
from mistral.main import main
from mistral.tokenizer import load_tokenizer

RANK, SCALING = 4, 2.0
TARGETS = ["layers.0.attention.wq.weight", "layers.1.attention.wv.weight", "layers.1.attention.wk.weight"]
DENSE_TARGETS = ["layers.0.feed_forward.w2.weight", "layers.1.feed_forward.w1.weight"]
MOE_TARGETS = ["layers.0.feed_forward.experts.2.w3.weight", "layers.1.feed_forward.gate.weight"]


def write_adapter(folder: Path, targets: list[str], shapes: dict[str, torch.Size], seed: int = 0) -> dict[str, torch.Tensor]:
    """lora.safetensors in folder, and params.json's lora section; returns the adapter's tensors."""
    torch.manual_seed(seed)
    lora = {}
    for name in targets:
        out, inp = shapes[name]
        stem = name.removesuffix(".weight")
        lora[f"{stem}.lora_A.weight"] = torch.randn(RANK, inp) * 0.1
        lora[f"{stem}.lora_B.weight"] = torch.randn(out, RANK) * 0.1
    save_file(lora, str(folder / "lora.safetensors"))
    params = json.loads((folder / PARAMS).read_text())
    (folder / PARAMS).write_text(json.dumps({**params, "lora": {"rank": RANK, "scaling": SCALING}}))
    return lora


@pytest.fixture
def adapted(tmp_path: Path, moe: bool) -> tuple[Path, Transformer, dict[str, torch.Tensor]]:
    base = random_model(tiny_args(moe=moe, sliding_window=None))
    base.save(tmp_path)
    shapes = {n: t.shape for n, t in base.state_dict().items()}
    lora = write_adapter(tmp_path, TARGETS + (MOE_TARGETS if moe else DENSE_TARGETS), shapes)
    return tmp_path, base, lora


def test_lora_merged_at_load_equals_merged_by_hand(adapted: tuple) -> None:
    folder, base, lora = adapted
    merged = Transformer.from_folder(folder, device=DEVICE, dtype=DTYPE, lora_path=folder / "lora.safetensors")
    by_hand = {n: t.clone() for n, t in base.state_dict().items()}
    for name in [n for n in lora if n.endswith("lora_A.weight")]:
        stem = name.removesuffix(".lora_A.weight")
        by_hand[stem + ".weight"] += SCALING * lora[stem + ".lora_B.weight"].to(DEVICE) @ lora[name].to(DEVICE)
    state = merged.state_dict()
    # float32: the same sums. bfloat16: the merge rounds the delta and then the sum, by
    # hand it is summed in bfloat16: each side within two roundings (2^-8 each) of the truth.
    tolerance = dict(atol=1e-6, rtol=0.0) if DTYPE == torch.float32 else dict(atol=1e-3, rtol=2**-7)
    for name, want in by_hand.items():
        assert torch.allclose(state[name].float(), want.float(), **tolerance), name
    reference = Transformer(base.args).to(device=DEVICE, dtype=DTYPE).eval()
    reference.load_state_dict(by_hand)
    changed = 0
    for prompt in random_prompts([9, 14], base.args.vocab_size):
        with torch.no_grad():
            got = merged(torch.tensor(prompt, device=DEVICE), [len(prompt)])
            want = reference(torch.tensor(prompt, device=DEVICE), [len(prompt)])
            plain = base(torch.tensor(prompt, device=DEVICE), [len(prompt)])
        assert rel_error(got, want) < RTOL
        changed += rel_error(plain, want) > 1e-3
    assert changed == 2  # the adapter really changes the model


def test_chat_with_lora_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from make_tiny_model import train_tokenizer

    base = random_model(tiny_args(vocab_size=512, sliding_window=None))
    base.save(tmp_path)
    train_tokenizer(tmp_path / "tokenizer.model", vocab_size=512)
    write_adapter(tmp_path, TARGETS, {n: t.shape for n, t in base.state_dict().items()})
    monkeypatch.setattr(sys, "argv", ["mistral", "chat", str(tmp_path), "--lora", str(tmp_path / "lora.safetensors"),
                                      "--max_tokens", "3", "--device", "cpu"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    main()
    assert "Traceback" not in capsys.readouterr().err


def test_generate_with_lora_option_runs_the_merged_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from make_tiny_model import train_tokenizer

    base = random_model(tiny_args(vocab_size=512, sliding_window=None))
    base.save(tmp_path)
    train_tokenizer(tmp_path / "tokenizer.model", vocab_size=512)
    write_adapter(tmp_path, TARGETS, {n: t.shape for n, t in base.state_dict().items()})
    monkeypatch.setattr(sys, "argv", ["mistral", "generate", str(tmp_path), "def f():", "--lora", str(tmp_path / "lora.safetensors"),
                                      "--max_tokens", "5", "--device", "cpu", "--json"])  # fmt: skip
    main()
    result = json.loads(capsys.readouterr().out)["results"][0]
    merged = Transformer.from_folder(tmp_path, lora_path=tmp_path / "lora.safetensors")
    eos_id = load_tokenizer(tmp_path).eos_id
    assert [result["tokens"]] == generate([result["prompt_tokens"]], merged, max_tokens=5, eos_id=eos_id)[0]


@pytest.mark.parametrize(
    "edit, message",
    [
        ("no section", r"params\.json: no 'lora' section \(rank, scaling\) for lora\.safetensors"),
        ("bad rank", r"lora_A\.weight is \[4, 64\] and its lora_B \[64, 4\], rank 8"),
        ("unknown target", r"adapts layers\.7\.attention\.wq\.weight, which the model does not have"),
        ("unpaired", r"has no layers\.0\.attention\.wq\.lora_B\.weight"),
    ],
)
def test_bad_adapter_is_a_mistral_error(tmp_path: Path, edit: str, message: str) -> None:
    base = random_model(tiny_args(sliding_window=None))
    base.save(tmp_path)
    shapes = {n: t.shape for n, t in base.state_dict().items()}
    lora = write_adapter(tmp_path, ["layers.0.attention.wq.weight"], shapes)
    params = json.loads((tmp_path / PARAMS).read_text())
    if edit == "no section":
        del params["lora"]
    elif edit == "bad rank":
        params["lora"]["rank"] = 8
    elif edit == "unknown target":
        lora = {k.replace("layers.0", "layers.7"): v for k, v in lora.items()}
    else:
        del lora["layers.0.attention.wq.lora_B.weight"]
    (tmp_path / PARAMS).write_text(json.dumps(params))
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with pytest.raises(MistralError, match=message):
        Transformer.from_folder(tmp_path, lora_path=tmp_path / "lora.safetensors")


def test_an_empty_adapter_one_aimed_at_a_norm_or_of_integers_is_an_error(tmp_path: Path) -> None:
    base = random_model(tiny_args())
    base.save(tmp_path)
    shapes = {n: t.shape for n, t in base.state_dict().items()}
    write_adapter(tmp_path, (), shapes)
    with pytest.raises(MistralError, match="holds no tensors"):
        Transformer.from_folder(tmp_path, lora_path=tmp_path / "lora.safetensors")
    norm = "layers.0.attention_norm.weight"
    save_file({"layers.0.attention_norm.lora_A.weight": torch.zeros(RANK, 4), "layers.0.attention_norm.lora_B.weight": torch.zeros(64, RANK)},
              str(tmp_path / "lora.safetensors"))  # fmt: skip
    with pytest.raises(MistralError, match=f"adapts {norm}, of shape \\[64\\]: LoRA adapts projection weights"):
        Transformer.from_folder(tmp_path, lora_path=tmp_path / "lora.safetensors")
    lora = write_adapter(tmp_path, ["layers.0.attention.wq.weight"], shapes)
    save_file({n: (t * 100).to(torch.int32) for n, t in lora.items()}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(MistralError, match=r"wq\.lora_A\.weight holds torch\.int32 values, where a float weight belongs"):
        Transformer.from_folder(tmp_path, lora_path=tmp_path / "lora.safetensors")  # it merged, and generated nonsense
