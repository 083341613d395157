"""Every error a user can meet: one line on stderr naming the bad value, exit code 2, no traceback (``--debug``
shows it); typed and finite training configs; knocks, folding and sequence-length limits that say what they do."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; read by huggingface_hub at import

from kha import AttentionConfig  # noqa: E402
from kha.cli import main, run_command  # noqa: E402
from kha.config import ModelConfig  # noqa: E402
from kha.errors import UserError, read_json  # noqa: E402
from kha.knock import fold_knocks, parse_targets  # noqa: E402
from kha.model import DecoderLM  # noqa: E402
from kha.train.config import TrainConfig, check_resume_steps, load_config  # noqa: E402

from conftest import fails, perturb  # noqa: E402

# --- 1. typed, finite training configs -------------------------------------------------------------------------


@pytest.mark.parametrize("line,expected", [
    ('decay_knocks = "no"', "decay_knocks = 'no' is not a boolean"),  # a non-empty string is no true
    ('lr = "fast"', "lr = 'fast' is not a number"),
    ("steps = 1.5", "steps = 1.5 is not an integer"),
    ("steps = true", "steps = True is not an integer"),
    ("seq_len = 1e20", "seq_len = 1e+20 is not an integer"),
    ('model_overrides = "big"', "model_overrides = 'big' is not a table"),
])
def test_toml_values_must_have_the_field_type(line, expected, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(f"steps = 3\n{line}\n" if not line.startswith("steps") else line + "\n")
    fails(["train", "--config", path], capsys, str(path), expected)


def test_an_int_is_a_valid_float(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("lr = 1\nweight_decay = 0\n")
    cfg = load_config(str(path))
    assert (cfg.lr, cfg.weight_decay) == (1, 0)


def test_malformed_toml_names_the_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text("steps = 3\n\nlr = = 0.1\n")
    fails(["train", "--config", path], capsys, str(path), "line 3, column 6")


@pytest.mark.parametrize("name,interval", [("lr", "(0, inf)"), ("grad_clip", "(0, inf)"),
                                           ("spike_threshold", "(0, inf)"), ("weight_decay", "[0, inf)"),
                                           ("warmup_frac", "[0, 1)"), ("min_lr_frac", "[0, 1]"),
                                           ("beta1", "[0, 1)"), ("beta2", "[0, 1)")])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_field_must_be_finite(name, interval, value):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a finite number in {interval}, got {value}")):
        TrainConfig(**{name: value})


def test_float_ranges_include_and_exclude_their_bounds():
    TrainConfig(weight_decay=0.0, min_lr_frac=1.0, warmup_frac=0.0)  # closed ends
    for name, value in (("lr", 0.0), ("warmup_frac", 1.0), ("min_lr_frac", 1.5), ("weight_decay", -0.1)):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: value})


def test_non_finite_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:  # tyro's own usage error, exit code 2
        main(["train", "--lr", "nan", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "lr must be a finite number in (0, inf), got nan" in capsys.readouterr().err


def test_knock_targets_without_a_knock_are_refused(tmp_path, capsys):
    assert parse_targets("none", None) == parse_targets("none", "") == ()
    with pytest.raises(ValueError, match=r"knock targets 'qkv' given with knock 'none'"):
        parse_targets("none", "qkv")
    with pytest.raises(ValueError, match=r"knock targets 'v' given with knock 'none'"):
        TrainConfig(knock="none", knock_targets="v")
    fails(["params", "tiny", "--targets", "qkv"], capsys, "--targets qkv needs --knock")


def test_inputs_longer_than_max_seq_len_are_refused():
    attn = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)
    model = DecoderLM(ModelConfig(attention=attn, n_layers=1, d_ff=64, vocab_size=50, max_seq_len=8))
    assert model(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 50)
    with pytest.raises(ValueError, match=r"input of 9 tokens is longer than max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_malformed_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text('{"grid": "table2",\n "seeds": [0, }\n')
    with pytest.raises(UserError, match=rf"{path}: not valid JSON: .* at line 2, column 15"):
        read_json(path)


# --- 2. the error boundary --------------------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    fails(["report", tmp_path], capsys, f"{tmp_path} holds no grid (no grid.json)")
    with pytest.raises(UserError, match="holds no grid"):
        main(["--debug", "report", str(tmp_path)])
    monkeypatch.setenv("KHA_DEBUG", "1")
    with pytest.raises(UserError, match="holds no grid"):
        main(["report", str(tmp_path)])


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert run_command(argparse.Namespace(command="train", func=interrupted)) == 130
    assert capsys.readouterr().err == "kha train: interrupted\n"


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('decay_knocks = "no"\n')
    cmd = [sys.executable, "-m", "kha.cli", "train", "--config", str(bad)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KHA_DEBUG": ""}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "decay_knocks = 'no' is not a boolean" in run.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserError" in debug.stderr


# --- 4. resuming below the checkpoint's step ---------------------------------------------------------------------


def test_resume_steps_below_the_checkpoint_are_refused():
    check_resume_steps(100, 100)  # a finished run: nothing left, nothing wrong
    check_resume_steps(150, 100)
    with pytest.raises(ValueError, match=r"--steps 50 is below the checkpoint's step 100"):
        check_resume_steps(50, 100)


# --- 5. folding makes the model config say knock none -------------------------------------------------------------


def test_fold_knocks_sets_the_model_config_to_knock_none():
    attn = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, knock="linear", knock_targets="qkv")
    model = DecoderLM(ModelConfig(attention=attn, n_layers=2, d_ff=64, vocab_size=50)).eval()
    perturb(model)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        fold_knocks(model)
        after = model(ids).logits
    assert model.cfg.attention.knock == "none" and model.cfg.attention.knock_targets == ()
    assert all(layer.attn.cfg.knock == "none" for layer in model.layers)
    # the config now describes the parameters: a fresh model of it takes the folded weights, strictly
    fresh = DecoderLM(model.cfg).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


# --- 6. every command, as a new user meets it --------------------------------------------------------------------


@pytest.mark.parametrize("argv,expected", [
    (["params", "nosuch"], "unknown preset 'nosuch'"),
    (["flops", "--seq-len", "0"], "seq_len must be positive, got 0"),
    (["flops", "--d-model", "-5"], "d_model must be a positive integer, got -5"),
    (["flops", "--n-heads", "0"], "n_heads must be a positive integer, got 0"),
    (["flops", "--d-ff", "-4"], "--d-ff must be a positive integer, got -4"),
    (["flops", "--json", "--targets", "qkv"], "--targets qkv needs --knock"),
    (["demo", "--steps", "0"], "--steps must be a positive integer, got 0"),
])
def test_bad_sizes_and_names(argv, expected, capsys):
    fails(argv, capsys, expected)


def test_ablate_refuses_a_non_finite_setting_before_writing(tmp_path, capsys):
    fails(["ablate", "table2", "--out", tmp_path / "grid", "--lr", "inf"], capsys,
          "lr must be a finite number in (0, inf), got inf")
    assert not (tmp_path / "grid").exists()


def test_folders_that_are_not_what_the_command_reads(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["report", empty], capsys, f"{empty} holds no grid (no grid.json)")
    fails(["plot", empty], capsys, f"{empty} is neither a grid directory")
    fails(["data", "prepare", "--source", tmp_path / "nowhere", "--out", tmp_path / "d"], capsys,
          f"{tmp_path / 'nowhere'}")
    fails(["train", "--data", tmp_path / "nodata", "--out", tmp_path / "run", "--steps", "1", "--no-progress"],
          capsys, f"{tmp_path / 'nodata'}: no such folder")
    fails(["hf-convert", "--from", empty, "--out", tmp_path / "o"], capsys,
          f"{empty}: neither a `kha train` run")
    fails(["eval", tmp_path / "norun", "--data", tmp_path / "nodata", "--out", tmp_path / "o"], capsys,
          f"{tmp_path / 'norun'}: no such folder")
    fails(["eval", empty, "--data", tmp_path / "nodata", "--out", tmp_path / "o"], capsys,
          f"{empty}: no model.safetensors")
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_damaged_run_files_are_named(tmp_path, capsys):
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text('{"n_layers": 2,\n "d_ff": }\n')
    (run / "model.safetensors").write_bytes(b"")
    fails(["hf-convert", "--from", run, "--out", tmp_path / "o"], capsys,
          f"{run / 'model_config.json'}: not valid JSON", "line 2, column 10")


# --- 3. Hugging Face commands -----------------------------------------------------------------------------------


def tiny_qwen3(folder: Path) -> Path:
    """A tiny randomly initialised transformers Qwen3ForCausalLM, saved (a stock checkpoint, not a KHA one)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("command", ["retrofit", "export", "hf-convert"])
def test_hf_commands_on_a_missing_folder(command, tmp_path, capsys):
    pytest.importorskip("transformers")
    missing = tmp_path / "nonexistent"
    fails([command, "--from", missing, "--out", tmp_path / "o"], capsys, f"{missing}: no such folder",
          "needs a network")


def test_retrofit_names_a_damaged_safetensors_file(tmp_path, capsys):
    stock = tiny_qwen3(tmp_path / "stock")
    truncate(stock / "model.safetensors")
    fails(["retrofit", "--from", stock, "--out", tmp_path / "kha"], capsys,
          f"{stock / 'model.safetensors'}: damaged safetensors file")


def test_export_of_a_stock_checkpoint_says_there_is_nothing_to_export(tmp_path, capsys):
    stock = tiny_qwen3(tmp_path / "stock")
    fails(["export", "--from", stock, "--out", tmp_path / "out"], capsys,
          f"{stock} holds a stock qwen3 model, not a KHA one", "nothing to export", "kha retrofit")
    assert not (tmp_path / "out").exists()


def test_export_names_a_damaged_kha_file(tmp_path, capsys):
    stock = tiny_qwen3(tmp_path / "stock")
    assert main(["retrofit", "--from", str(stock), "--knock", "linear", "--out", str(tmp_path / "kha")]) == 0
    truncate(tmp_path / "kha" / "model.safetensors")
    fails(["export", "--from", tmp_path / "kha", "--out", tmp_path / "out"], capsys,
          f"{tmp_path / 'kha' / 'model.safetensors'}: damaged safetensors file")


# --- 6. damaged manifests, grids, tokenizers and lock files; odd flag values (a re-run of the campaign) -------------


def _manifest_copy(data_dir: Path, tmp_path: Path, edit) -> Path:
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    edit(folder / "manifest.json")
    return folder


@pytest.mark.parametrize("how,expected", [
    ("truncated", "manifest.json: not valid JSON: Expecting value at line 2, column 1"),
    ("a list", "manifest.json: not a manifest (a JSON object)"),
    ("no splits", "manifest.json: a damaged manifest (KeyError: 'splits')"),
    ("vocab_size edited", "manifest.json says vocab_size 100, its tokenizer has"),
])
def test_a_damaged_manifest_is_named_before_training(how, expected, data_dir, tmp_path, capsys):
    import json

    def edit(path: Path) -> None:
        m = json.loads(path.read_text())
        if how == "truncated":
            path.write_text('{"format":\n')
            return
        if how == "a list":
            m = [m]
        elif how == "no splits":
            del m["splits"]
        else:
            m["tokenizer"]["vocab_size"] = 100  # would index past the embedding mid-run
        path.write_text(json.dumps(m))

    folder = _manifest_copy(data_dir, tmp_path, edit)
    fails(["data", "verify", folder], capsys, str(folder / "manifest.json"), expected)
    fails(["train", "--data", folder, "--out", tmp_path / "run", "--steps", "1"], capsys, expected)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_file_that_is_no_tokenizer_is_named_as_given(tmp_path, capsys):
    bad = tmp_path / "tok.json"
    bad.write_text("not json")
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(3):
        (src / f"d{i}.txt").write_text(f"document {i}\n" * 20)
    fails(["data", "prepare", "--source", src, "--out", tmp_path / "data", "--tokenizer", bad, "--quiet"], capsys,
          f"{bad}: not a Hugging Face tokenizers tokenizer.json")
    assert not (tmp_path / "data" / "tokenizer.json").exists()  # refused before it was copied


def test_a_failed_download_in_data_prepare_goes_through_the_error_boundary(tmp_path, capsys, monkeypatch):
    import kha.data.prepare

    def offline(*args, **kwargs):
        raise RuntimeError("could not download the Shakespeare archive: no network")

    monkeypatch.setattr(kha.data.prepare, "prepare", offline)
    fails(["data", "prepare", "--out", tmp_path / "d"], capsys, "could not download", "--debug shows the traceback")


@pytest.mark.parametrize("overrides,expected", [
    ({"moe": 5}, "model override moe = 5 is not a table of MoEConfig fields"),
    ({"moe": {"n_experts": 4}}, "missing 2 required positional arguments"),
    ({"moe": {"n_experts": 4, "top_k": 1, "d_expert": 8, "colour": 1}}, "unexpected keyword argument 'colour'"),
    ({"attention": 7}, "model override attention = 7 is not a table of AttentionConfig fields"),
])
def test_model_overrides_of_the_wrong_shape_are_user_errors(overrides, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        TrainConfig(model_overrides=overrides)


def test_an_unknown_doc_positions_is_refused_at_the_config(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('doc_mask = true\ndoc_positions = "reset"\n')
    fails(["train", "--config", path], capsys, str(path), "unknown doc_positions 'reset'; valid are restart, continue")


def usage_error(argv, capsys, *expected: str) -> None:
    """``kha train`` flags are parsed by tyro: a bad value is its usage error (exit 2) holding every ``expected``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # tyro wraps its lines
    for text in expected:
        assert text in err, (text, err)


def test_a_seed_out_of_range_is_refused_at_the_config(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("seed = -1\n")
    fails(["train", "--config", path], capsys, str(path), f"seed must be an integer in [0, {2**63 - 1}] (2**63 - 1), "
          "got -1")
    usage_error(["train", "--seed", 2**70], capsys, f"seed must be an integer in [0, {2**63 - 1}] (2**63 - 1), "
                f"got {2**70}")  # torch.manual_seed would overflow past 2**64


def test_report_and_plot_name_a_folder_without_or_with_a_damaged_grid(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["report", empty], capsys, f"{empty} holds no grid (no grid.json); run `kha ablate GRID --out {empty}` first")
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text('{"grid": "table1",\n "variants": [}\n')
    for command in ("report", "plot"):
        fails([command, grid], capsys, f"{grid / 'grid.json'}: not valid JSON", "line 2")
    (grid / "grid.json").write_text("{}")
    for command in (["report", grid], ["plot", grid], ["ablate", "table1", "--out", grid, "--report"]):
        fails(command, capsys, f"{grid / 'grid.json'} is not a grid file written by `kha ablate`")
    for level in ("2", "0", "nan"):
        fails(["report", grid, "--level", level], capsys, "--level must be a confidence level in (0, 1)")


def test_ablate_with_no_seeds_is_refused_before_writing(tmp_path, capsys):
    for seeds in ("0", "-2"):
        fails(["ablate", "table1", "--out", tmp_path / "g", "--seeds", seeds], capsys, "no seeds: --seeds must be")
    assert not (tmp_path / "g").exists()


def test_run_files_of_a_grid_and_checkpoint_meta_name_their_file(tmp_path):
    from kha.analysis.tables import load_run
    from kha.experiments import _check_same_config
    from kha.train.checkpoint import read_model_state

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{\n")
    with pytest.raises(UserError, match=re.escape(f"{run / 'train_config.json'}: not valid JSON")):
        load_run(run)
    with pytest.raises(UserError, match=re.escape(f"{run / 'train_config.json'}: not valid JSON")):
        _check_same_config(TrainConfig(out=str(run)))
    (run / "meta.json").write_text('{"step": }')
    with pytest.raises(UserError, match=re.escape(f"{run / 'meta.json'}: not valid JSON")):
        read_model_state(run)


def test_a_grid_folder_moved_elsewhere_still_holds_the_same_runs(tmp_path):
    import json

    from kha.experiments import _check_same_config

    cfg = TrainConfig(out=str(tmp_path / "moved" / "runs" / "baseline" / "seed_0"))
    Path(cfg.out).mkdir(parents=True)
    old = {**cfg.to_dict(), "out": str(tmp_path / "original" / "runs" / "baseline" / "seed_0")}
    (Path(cfg.out) / "train_config.json").write_text(json.dumps(old))
    _check_same_config(cfg)  # only where it lies changed
    (Path(cfg.out) / "train_config.json").write_text(json.dumps({**old, "lr": 0.01}))
    with pytest.raises(ValueError, match=r"another config \(lr: 0.01 -> 0.003\)"):
        _check_same_config(cfg)


@pytest.mark.parametrize("command", ["retrofit", "export", "hf-convert"])
def test_hf_commands_refuse_to_write_into_the_folder_they_read(command, tmp_path, capsys):
    pytest.importorskip("transformers")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    fails([command, "--from", folder, "--out", str(folder) + "/"], capsys, "is the --from folder",
          "choose another --out")
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_eval_refuses_an_unknown_device_before_writing(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    (run / "model_config.json").write_text("{}")
    fails(["eval", run, "--data", data_dir, "--out", tmp_path / "o", "--device", "tpu"], capsys,
          "--device 'tpu' is not a torch device")
    assert not (tmp_path / "o").exists()


# --- small silent accepts, and what a newcomer trips on ----------------------------------------------------------


def test_an_empty_out_and_absurd_steps_are_refused(tmp_path, capsys):
    usage_error(["train", "--out", ""], capsys, "out must name a run folder, got ''")
    path = tmp_path / "c.toml"
    path.write_text('out = " "\n')
    fails(["train", "--config", path], capsys, str(path), "out must name a run folder, got ' '")
    usage_error(["train", "--steps", 10**20], capsys, "steps must be at most 1,000,000,000 (10**9), got "
                "100,000,000,000,000,000,000")
    TrainConfig(steps=10**9)  # the bound itself is fine


def test_token_ids_outside_the_vocabulary_or_not_integers_are_named():
    model = DecoderLM(ModelConfig(attention=AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8),
                                  n_layers=1, d_ff=64, vocab_size=97))
    ids = torch.tensor([[1, 2, 96]])
    model(ids)  # the largest valid id
    with pytest.raises(ValueError, match=re.escape("token id 97, outside the vocabulary [0, 97)")):
        model(torch.tensor([[1, 97, 3]]))
    with pytest.raises(ValueError, match=re.escape("token id -1, outside the vocabulary [0, 97)")):
        model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(ValueError, match=re.escape("input_ids must be integer token ids, got dtype torch.float32")):
        model(ids.float())
    with pytest.raises(ValueError, match="got dtype torch.bool"):
        model(ids > 1)
    model(ids.int())  # int32 ids are ids


def test_token_ids_are_checked_outside_compile_only():
    from kha.model import check_token_ids

    with pytest.raises(ValueError, match="token id 12, outside"):
        check_token_ids(torch.tensor([3, 12]), 10)
    # compiled (fullgraph: any graph break fails): integer ids pass the dtype check, the range is not checked
    compiled = torch.compile(lambda x: check_token_ids(x, 10) or x + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(torch.tensor([3, 12])), torch.tensor([4, 13]))


def _corpus(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"d{i}.txt").write_text(f"document {i} of a few words\n" * 20)
    return folder


def test_data_prepare_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    import kha.data.prepare

    class FullDisk:
        """A file whose writes fail as on a full disk (``ENOSPC``, no file name: what ``write`` raises)."""

        def __init__(self, path, mode):
            self.file = open(path, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(kha.data.prepare, "open", FullDisk, raising=False)
    out = tmp_path / "data"
    fails(["data", "prepare", "--source", _corpus(tmp_path / "src"), "--out", out, "--vocab-size", 300, "--quiet"],
          capsys, f"{out / 'train.bin'}: no space left on device")
    assert sorted(p.name for p in out.iterdir()) == []  # no tokenizer.json, no temporary shard


def test_data_prepare_names_sources_whose_texts_are_all_empty(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"text": ""}\n\n{"text": ""}\n')
    fails(["data", "prepare", "--source", path, "--out", tmp_path / "d", "--quiet"], capsys,
          f"no text found in {path}: all 3 document(s) are empty", "--text-field 'text'")
    assert not (tmp_path / "d" / "tokenizer.json").exists()


def test_resume_with_other_steps_warns_with_the_old_and_new_lr(data_dir, tmp_path, capsys):
    from kha.train import train
    from kha.train.loop import schedule_change
    from kha.train.optim import lr_at

    from conftest import small_run

    train(small_run(data_dir, tmp_path / "run", steps=3))
    longer = small_run(data_dir, tmp_path / "run", steps=6, resume=True)
    capsys.readouterr()
    train(longer)
    out = capsys.readouterr().out
    expected = (f"warning: resuming with a changed schedule (--steps 3 -> 6): the warmup + cosine LR schedule is "
                f"recomputed for 6 steps; the LR of step 4 is {lr_at(3, longer):.3g} (it would have been "
                f"{lr_at(3, small_run(data_dir, tmp_path, steps=3)):.3g}), ending at {lr_at(5, longer):.3g} at step 6")
    assert expected in out, out
    assert lr_at(3, longer) != lr_at(3, small_run(data_dir, tmp_path, steps=3))
    # the same settings: no warning
    assert schedule_change(json.loads((tmp_path / "run" / "train_config.json").read_text()), longer, 6) is None


@pytest.mark.parametrize("flags,expected", [
    (["--optimizer", "muon"], "this run trained with optimizer='adamw', not 'muon': pass --optimizer adamw"),
    (["--knock-decay", "identity"],
     "this run trained with knock_decay='zero', not 'identity': pass --knock-decay zero"),
])
def test_a_resume_onto_another_optimizer_setting_is_refused(data_dir, tmp_path, capsys, flags, expected):
    """The optimizer's groups and state belong to the run: another optimizer or knock decay is one line naming the
    flag to pass; ``--decay-knocks`` (the older spelling) and ``--knock-decay zero`` count as the same."""
    from kha.train import train

    from conftest import small_run

    out = tmp_path / "run"
    train(small_run(data_dir, out, steps=3, knock="mlp", decay_knocks=True))
    train(small_run(data_dir, out, steps=3, knock="mlp", knock_decay="zero", resume=True))  # the same decay
    cfg = small_run(data_dir, out, steps=3, knock="mlp", decay_knocks=True, resume=True)
    overrides = {"optimizer": "muon"} if flags[0] == "--optimizer" else {"knock_decay": "identity",
                                                                          "decay_knocks": False}
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        train(dataclasses.replace(cfg, **overrides))


def test_resume_with_another_batch_names_the_batch_size_flag(data_dir, tmp_path, capsys):
    from kha.train import train

    from conftest import small_run

    train(small_run(data_dir, tmp_path / "run", steps=3))
    config = (tmp_path / "run" / "train_config.json").read_bytes()
    fails(["train", "--preset", "tiny", "--data", data_dir, "--out", tmp_path / "run", "--seq-len", 32,
           "--batch-size", 2, "--steps", 6, "--eval-batches", 2, "--resume", "--no-progress"], capsys,
          "cannot resume: the run was started with --batch-size x processes (the global batch) 4, this call has 2; "
          "resume with the run's settings (with 1 process(es): --batch-size 4)")
    assert (tmp_path / "run" / "train_config.json").read_bytes() == config  # refused before anything is written


def test_ablate_warns_when_auto_precision_means_bf16_on_a_cpu(monkeypatch):
    import kha.train.loop
    from kha.experiments import bf16_comparison_warning

    def bf16_when_auto(cfg, device, asked=None):
        return ("bf16" if cfg.precision == "auto" else cfg.precision), "test", False

    monkeypatch.setattr(kha.train.loop, "planned_precision", bf16_when_auto)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    note = bf16_comparison_warning([TrainConfig(), TrainConfig(knock="mlp")])
    assert note.startswith("warning: --precision auto trains these runs in bf16 on this CPU")
    assert "docs/benchmarks.md, section h" in note and "pass --precision fp32" in note
    assert "unreliable at small scale" in note
    assert bf16_comparison_warning([TrainConfig(precision="fp32")]) is None
    assert bf16_comparison_warning([TrainConfig(precision="bf16")]) is None  # asked for: no warning
    assert bf16_comparison_warning([TrainConfig(device="cuda")]) is None  # not a CPU run


def test_ablate_warning_follows_the_real_auto_rule():
    from kha.experiments import bf16_comparison_warning
    from kha.train.loop import planned_precision

    cfg = TrainConfig(device="cpu")
    assert (bf16_comparison_warning([cfg]) is not None) == (planned_precision(cfg, torch.device("cpu"))[0] == "bf16")


def test_a_stopped_demo_does_not_point_at_a_resume_flag_it_lacks(tmp_path, capsys, monkeypatch):
    import signal

    import kha.data.prepare
    import kha.train
    from kha.errors import RunStopped

    def stopped(cfg):
        raise RunStopped("stopped by SIGTERM after step 3 of 200; saved X; continue with --resume", signal.SIGTERM)

    monkeypatch.setattr(kha.data.prepare, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(kha.train, "train", stopped)
    assert main(["demo", "--steps", "2", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d")]) == 143
    err = capsys.readouterr().err
    assert err.startswith("kha demo: stopped by SIGTERM while training baseline"), err
    assert "--resume" not in err and "run `kha demo` again" in err


def test_flops_takes_a_preset(capsys):
    import json
    from dataclasses import replace

    from kha.config import get_preset
    from kha.flops import layer_flops

    for name in ("tiny", "tiny-moe", "mla-a0.8b"):
        capsys.readouterr()
        assert main(["flops", name, "--json", "--knock", "linear", "--seq-len", "256"]) == 0
        got = json.loads(capsys.readouterr().out)
        model = get_preset(name)
        d_ff = model.moe.top_k * model.moe.d_expert if model.moe else model.d_ff
        ref = layer_flops(replace(model.attention, knock="linear", knock_targets=None), 256, d_ff)
        assert (got["attention"], got["ffn"], got["knock"]) == (ref.attention, ref.ffn, ref.knock), name
    assert main(["flops", "tiny", "--n-heads", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = layer_flops(AttentionConfig(d_model=128, n_heads=8), 2048, 384)
    assert got["attention"] == ref.attention
    fails(["flops", "tiny-dense"], capsys, "unknown preset 'tiny-dense'; valid presets are")


def test_eval_help_shows_the_real_hf_convert_flags(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "kha hf-convert --from RUN_DIR --out HF_DIR" in out and "hf-convert RUN_DIR" not in out
