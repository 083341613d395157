"""``kha generate`` and the sampling behind it: cached greedy decoding against uncached argmax, top-k / top-p
against hand-computed distributions, seeds, streaming of multi-byte text, the command end to end on a trained run
and on its Hugging Face conversion, and its one-line errors."""

import json
import math

import pytest
import torch

from kha.attention import AttentionConfig
from kha.cli import main
from kha.config import ModelConfig
from kha.data.tokenizer import load_tokenizer
from kha.generate import Sampling, TextStream, generate_text, load_generator
from kha.model import DecoderLM
from kha.sampling import filter_logits, next_token

from conftest import perturb, small_run

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def small_lm(seed=0) -> DecoderLM:
    torch.manual_seed(seed)
    attn = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, knock="mlp", knock_targets="v")
    model = DecoderLM(ModelConfig(attention=attn, n_layers=2, d_ff=64, vocab_size=61, max_seq_len=64))
    perturb(model, scale=0.05)
    return model.eval()


def test_greedy_generate_equals_argmax_of_the_uncached_forward_and_stops_at_eos():
    model = small_lm()
    prompt = torch.randint(0, 61, (1, 5))
    expected = prompt
    with torch.no_grad():  # reference: the full forward over everything so far, no cache
        for _ in range(8):
            expected = torch.cat((expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    seen = []
    out = model.generate(prompt, 8, on_token=lambda t: seen.append(int(t)))
    assert torch.equal(out, expected) and seen == expected[0, 5:].tolist()
    # the 4th new token as EOS: generation ends right after it
    eos = int(expected[0, 8])
    first = expected[0, 5:].tolist().index(eos)
    assert torch.equal(model.generate(prompt, 8, eos_token_id=eos), expected[:, :5 + first + 1])


def test_a_finished_row_pads_with_eos_while_others_go_on():
    model = small_lm()
    prompts = torch.randint(0, 61, (2, 5))
    free = model.generate(prompts, 6)
    eos = int(free[0, 6])  # row 0's second new token
    out = model.generate(prompts, 6, eos_token_id=eos)
    row0 = free[0, 5:].tolist()
    stop = row0.index(eos)
    assert out[0, 5:].tolist() == row0[:stop + 1] + [eos] * (out.shape[1] - 6 - stop)
    if eos not in free[1, 5:].tolist():
        assert torch.equal(out[1], free[1])


@pytest.mark.parametrize("top_k,top_p,kept", [
    (None, None, [0, 1, 2, 3, 4]),
    (2, None, [0, 1]),
    (None, 0.75, [0, 1, 2]),   # the tokens before the 3rd hold 0.70 < 0.75: it stays; the 4th's hold 0.85
    (None, 0.4, [0]),          # the most likely token always stays
    (4, 0.6, [0, 1]),
    (3, 0.99, [0, 1, 2]),       # top-k first, then the nucleus of what is left
])
def test_top_k_top_p_give_the_hand_computed_distribution(top_k, top_p, kept):
    perm = torch.tensor([3, 0, 4, 1, 2])  # token i has probability PROBS[perm_inverse[i]]: order must not matter
    probs = torch.zeros(5)
    probs[perm] = torch.tensor(PROBS)
    logits = probs.log()[None]
    filtered = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)[0]
    expected = torch.zeros(5)
    mass = sum(PROBS[i] for i in kept)
    for i in kept:
        expected[perm[i]] = PROBS[i] / mass
    torch.testing.assert_close(filtered, expected, rtol=0, atol=1e-6)
    # draws follow it: 20,000 draws, each frequency within 0.02 (4.5 standard deviations at p = 0.5)
    gen = torch.Generator().manual_seed(0)
    draws = next_token(logits.expand(20_000, 5), 1.0, top_k, top_p, gen)[:, 0]
    freq = torch.bincount(draws, minlength=5).float() / 20_000
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.02)


def test_temperature_scales_the_logits_before_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = next_token(logits.expand(20_000, 3), 2.0, None, None, gen)[:, 0]
    expected = torch.softmax(logits[0] / 2, dim=0)
    torch.testing.assert_close(torch.bincount(draws, minlength=3).float() / 20_000, expected, rtol=0, atol=0.02)


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    from kha.train import train

    out = tmp_path_factory.mktemp("gen") / "run"
    train(small_run(data_dir, out, steps=3, ckpt_every=3, eval_every=3))
    return out


def test_streaming_holds_back_split_characters_and_equals_the_final_text(data_dir):
    tok = load_tokenizer(data_dir / "tokenizer.json")
    text = "naïve café → 世界 ✓ done"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the 512-id BPE splits these characters' bytes
    pieces = []
    stream = TextStream(tok, pieces.append)
    for i in ids:
        stream.add(i)
    assert stream.close() == text and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_same_seed_same_text_and_stream_equals_result(trained_run):
    model, tok = load_generator(str(trained_run))
    settings = Sampling(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=3)
    pieces = []
    first = generate_text(model, tok, "def ", settings, pieces.append)
    assert first == generate_text(model, tok, "def ", settings) == "".join(pieces)
    others = {generate_text(model, tok, "def ", Sampling(24, 1.0, None, 0.95, seed)) for seed in range(4, 8)}
    assert len(others | {first}) > 1  # other seeds, other texts (a 3-step model is close to uniform)
    greedy = generate_text(model, tok, "import", Sampling(max_new_tokens=10, temperature=0))
    ids = [0, *tok.encode("import", add_special_tokens=False).ids]
    ref = model.generate(torch.tensor([ids]), 10, eos_token_id=0)[0, len(ids):].tolist()
    assert greedy == tok.decode([i for i in ref if i != 0])


def test_cli_streams_prompt_and_continuation(trained_run, tmp_path, capsys):
    model, tok = load_generator(str(trained_run))
    settings = Sampling(max_new_tokens=12, temperature=0.9, top_k=50, seed=7)
    expected = [p + generate_text(model, tok, p, settings) for p in ("class ", "x = ")]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x = \n\n")
    capsys.readouterr()
    assert main(["generate", str(trained_run), "--prompt", "class ", "--prompts-file", str(prompts),
                 "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "50", "--seed", "7"]) == 0
    assert capsys.readouterr().out == "\n\n".join(expected) + "\n"


def test_cli_on_the_hugging_face_conversion_gives_the_same_text(trained_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["hf-convert", "--from", str(trained_run), "--out", str(tmp_path / "hf")]) == 0
    args = ["--prompt", "def f(", "--max-new-tokens", "10", "--seed", "2"]
    capsys.readouterr()
    assert main(["generate", str(trained_run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out == from_run


def fails(argv, capsys, *expected):
    """``kha generate ARGV`` exits 2 with one stderr line holding every ``expected`` text."""
    capsys.readouterr()
    assert main(["generate", *(str(a) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("kha generate: error:"), err
    for text in expected:
        assert text in err, (text, err)


def test_errors_are_one_line(trained_run, tmp_path, capsys):
    run = str(trained_run)
    fails([run, "--prompt", "a", "--temperature", "-1"], capsys, "temperature must be >= 0", "got -1.0")
    fails([run, "--prompt", "a", "--temperature", "nan"], capsys, "temperature must be >= 0", "got nan")
    fails([run, "--prompt", "a", "--top-p", "0"], capsys, "top_p must be in (0, 1], got 0.0")
    fails([run, "--prompt", "a", "--top-p", "1.5"], capsys, "top_p must be in (0, 1], got 1.5")
    fails([run, "--prompt", "a", "--top-k", "0"], capsys, "top_k must be a positive integer, got 0")
    fails([run, "--prompt", "a", "--top-k", "100000"], capsys, "top_k must be in 1..512, got 100000")
    fails([run, "--prompt", "a", "--max-new-tokens", "0"], capsys, "--max-new-tokens must be a positive integer")
    fails([run, "--prompt", "a", "--max-new-tokens", "100000"], capsys, "exceed the model's max_seq_len")
    fails([run, "--prompt", "a", "--seed", str(2**70)], capsys, f"--seed must be an integer in [0, {2**64 - 1}]")
    fails([run], capsys, "no prompt: give --prompt TEXT")
    (tmp_path / "empty.txt").write_text("\n  \n")
    fails([run, "--prompts-file", tmp_path / "empty.txt"], capsys, "empty.txt: no prompt in it")
    fails([tmp_path / "nowhere", "--prompt", "a"], capsys, "nowhere: no such folder")
    # a run without final weights names its newest checkpoint
    partial = tmp_path / "partial"
    (partial / "checkpoints" / "step_0000003").mkdir(parents=True)
    fails([partial, "--prompt", "a"], capsys, "no final model.safetensors", "step_0000003", "--resume")
    fails([tmp_path, "--prompt", "a"], capsys, "no model weights")
    # weights but no tokenizer: the data folder it names is gone
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("model.safetensors", "model_config.json"):
        (moved / name).write_bytes((trained_run / name).read_bytes())
    (moved / "train_config.json").write_text(json.dumps({"data": str(tmp_path / "gone")}))
    fails([moved, "--prompt", "a"], capsys, "no tokenizer.json", "--tokenizer FILE")


def test_generate_checks_settings_in_the_model_too():
    model = small_lm()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        model.generate(prompt, 2, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(prompt, 2, temperature=math.inf)
