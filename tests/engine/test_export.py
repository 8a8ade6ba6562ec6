"""Exporting a pretrain checkpoint as a Hugging Face model directory: what transformers loads from it
computes what blissctl's model computes, its tokenizer encodes as the run's, and the folder is
replaced only when asked and never left half-written."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
import torch
import typer
from tokenizers import Tokenizer
from typer.testing import CliRunner

from blissctl.export import export_command
from engine.data.tokenizer import END_OF_TEXT, PADDING, train_bpe_tokenizer
from engine.errors import UserError
from engine.models.checkpoints import load_pretrained_model, write_checkpoint
from engine.models.export import export_hf
from engine.models.families import build_causal_lm, padded_vocab_size
from engine.models.presets import ModelConfig, pythia_tiny
from engine.run_dir import RunDir, config_to_dict
from tests.conftest import PYTHIA_TOKENIZER, make_records, write_shard

TEXT = "The first of them was not, he said, like any other.\n  Two spaces  and an <|endoftext|> inside."

LLAMA_TINY = ModelConfig(name="llama-tiny", family="llama", n_layers=2, d_model=64, n_heads=4, d_ff=128,
                         rotary_pct=1.0)


def cli_app() -> typer.Typer:
    """The command as the lead registers it, on an app of its own (a callback keeps ``export`` a sub-command)."""
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("export")(export_command)
    return app


runner = CliRunner()


@pytest.fixture(scope="module")
def odd_tokenizer(tmp_path_factory) -> Path:
    """A 600-token BPE: its vocabulary is not a multiple of 128, so the model's embedding has spare rows."""
    path = tmp_path_factory.mktemp("odd-tokenizer") / "tokenizer.json"
    path.write_text(train_bpe_tokenizer([r["text"] for r in make_records(200, seed=7)], vocab_size=600).to_str())
    return path


def fake_checkpoint(root: Path, model_config: ModelConfig, tokenizer_path: Path, *, step: int = 10):
    """A run directory with one checkpoint in the format pretraining writes; ``(its folder, the model)``."""
    vocab_size = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    model = build_causal_lm(model_config, vocab_size, seed=3)
    folder = write_checkpoint(root / "checkpoints", step, model_state=model.state_dict(), optimizer_state={},
                              trainer_state={"step": step}, rng_states=[], tokenizer_path=tokenizer_path, keep=1,
                              meta={"model": config_to_dict(model_config), "vocab_size": vocab_size})
    return folder, model.eval()


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- the model --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_config", "architecture", "model_type"),
                         [(pythia_tiny(), "GPTNeoXForCausalLM", "gpt_neox"),
                          (LLAMA_TINY, "LlamaForCausalLM", "llama")], ids=["pythia", "llama"])
def test_transformers_loads_the_export_and_computes_the_same_logits(tmp_path, odd_tokenizer, model_config,
                                                                    architecture, model_type):
    checkpoint, ours = fake_checkpoint(tmp_path / "run", model_config, odd_tokenizer)
    result = export_hf(tmp_path / "run", tmp_path / "hf")

    assert result.path == tmp_path / "hf" and result.checkpoint == checkpoint and result.step == 10
    assert result.family == model_config.family and result.architecture == architecture
    assert result.n_params == sum(p.numel() for p in ours.parameters())
    theirs = hf_model(tmp_path / "hf")
    assert type(theirs).__name__ == architecture and theirs.dtype == torch.float32
    # the padded embedding rows survive: 600 tokens, 640 rows
    assert theirs.get_input_embeddings().weight.shape[0] == padded_vocab_size(600) == 640
    ids = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, -1] = 599  # the tokenizer's last id, next to the spare rows
    ids[1, :2] = torch.tensor([0, 1])  # end-of-text and padding: LLaMA's embedding gets padding_idx=pad id
    # Same weights, same class, same float32 kernels on the same machine: bit-for-bit equal.
    assert torch.equal(logits(theirs, ids), logits(ours, ids))

    # What vLLM and lm-eval read from config.json: the class to build, the family, the dtype
    # (under both the transformers 4 and 5 key), and the special ids the tokenizer uses.
    config = orjson.loads((tmp_path / "hf" / "config.json").read_bytes())
    assert config["architectures"] == [architecture] and config["model_type"] == model_type
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 1)
    generation = orjson.loads((tmp_path / "hf" / "generation_config.json").read_bytes())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (0, 1)
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    # readable as any file the user writes (a vLLM server may run as another user), not 0600/0700
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()} == dict.fromkeys(names, 0o666 & ~umask)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_checkpoint_of_a_real_pretrain_run_exports(tmp_path, small_tokenizer):
    from engine.pretrain.launch import prepare_data, resolve_config
    from engine.pretrain.train import train

    shard = write_shard(tmp_path / "train.jsonl", make_records(60, seed=11))
    run = RunDir(tmp_path / "run")
    cfg = resolve_config({"data": (str(shard),), "tokenizer": str(small_tokenizer), "size": "tiny", "seq_len": 32,
                          "global_batch_tokens": 128, "micro_batch": 4, "steps": 2, "save_every": 2,
                          "log_every": 1, "device": "cpu"}, run, resume=False)
    prepare_data(cfg, run, workers=1)
    trained = train(cfg, quiet=True)

    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert result.step == 2 and result.checkpoint == trained.checkpoint
    ours, _ = load_pretrained_model(trained.checkpoint)
    ids = torch.arange(24).reshape(2, 12)
    assert torch.equal(logits(hf_model(tmp_path / "hf"), ids), logits(ours, ids))


# --- the tokenizer ----------------------------------------------------------------------------------


def no_padding_tokenizer(folder: Path) -> Path:
    """A tokenizer with an end-of-text token and no ``<|padding|>``."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([r["text"] for r in make_records(50, seed=5)], trainer=trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("which", ["blissctl", "pythia", "no-padding"])
def test_the_exported_tokenizer_encodes_as_the_run_tokenizer(tmp_path, small_tokenizer, which):
    path = {"blissctl": lambda: small_tokenizer, "pythia": lambda: PYTHIA_TOKENIZER,
            "no-padding": lambda: no_padding_tokenizer(tmp_path / "tok")}[which]()
    fake_checkpoint(tmp_path / "run", pythia_tiny(), path)
    export_hf(tmp_path / "run", tmp_path / "hf")

    ours, theirs = Tokenizer.from_file(str(path)), hf_tokenizer(tmp_path / "hf")
    expected = ours.encode(TEXT, add_special_tokens=False).ids
    assert theirs(TEXT, add_special_tokens=False).input_ids == expected
    assert theirs(TEXT).input_ids == expected  # nothing prepended: training saw documents without a bos
    for skip in (True, False):  # the two libraries' defaults differ; both settings must agree
        assert theirs.decode(expected, skip_special_tokens=skip) == ours.decode(expected, skip_special_tokens=skip)
    eot = ours.token_to_id(END_OF_TEXT)
    pad = ours.token_to_id(PADDING) if which != "no-padding" else eot  # no padding token: pad with eot
    assert (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id) == (eot, eot, pad)
    config = orjson.loads((tmp_path / "hf" / "config.json").read_bytes())
    assert (config["eos_token_id"], config["pad_token_id"]) == (eot, pad)
    # transformers 4 (what many lm-eval and vLLM installs pin) resolves this class name; 5's own does not
    settings = orjson.loads((tmp_path / "hf" / "tokenizer_config.json").read_bytes())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert theirs.model_max_length == pythia_tiny().max_seq_len


# --- the destination --------------------------------------------------------------------------------


def test_an_existing_export_is_replaced_only_with_force(tmp_path, odd_tokenizer):
    fake_checkpoint(tmp_path / "run", pythia_tiny(), odd_tokenizer, step=10)
    out = tmp_path / "hf"
    out.mkdir()  # an empty folder is no obstacle
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]
    first = runner.invoke(cli_app(), args)
    assert first.exit_code == 0, first.output
    assert f"wrote {out}" in first.stdout and "from_pretrained" in first.stdout and "lm_eval" in first.stdout
    (out / "stale.txt").write_text("from an earlier export")

    refused = runner.invoke(cli_app(), args)
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert (out / "stale.txt").exists()

    fake_checkpoint(tmp_path / "run", pythia_tiny(), odd_tokenizer, step=20)
    replaced = runner.invoke(cli_app(), [*args, "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert "step 20" in replaced.stdout
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()  # replaced whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # --force replaces an export, never a folder of something else (a mistyped --out)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("months of work")
    refused = runner.invoke(cli_app(), ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(other),
                                        "--force"])
    assert refused.exit_code == 2 and "not a model export" in refused.stderr
    assert (other / "thesis.tex").read_text() == "months of work"
    with pytest.raises(UserError, match="holds the checkpoint"):
        export_hf(tmp_path / "run", tmp_path, force=True)


def test_a_failing_export_leaves_the_old_one_intact_and_nothing_half_written(tmp_path, odd_tokenizer, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    fake_checkpoint(tmp_path / "run", pythia_tiny(), odd_tokenizer)
    out = export_hf(tmp_path / "run", tmp_path / "hf").path
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(self, *args, **kwargs):  # fails after the weights are written: a partial folder exists
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(OSError):
        export_hf(tmp_path / "run", out, force=True)
    with pytest.raises(OSError):
        export_hf(tmp_path / "run", tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no partial folder, no "new"


def test_a_foreign_checkpoint_is_one_line(tmp_path):
    folder = tmp_path / "step_000001"
    folder.mkdir()
    (folder / "meta.json").write_bytes(orjson.dumps({"model": {"name": "x"}, "vocab_size": 10}))
    (folder / "model.pt").write_bytes(b"not a torch file")
    result = runner.invoke(cli_app(), ["export", "--checkpoint", str(folder), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "not a blissctl checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
