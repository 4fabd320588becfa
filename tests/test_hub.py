"""Push to the Hub for real: hftune runs (in subprocesses, as users run it) push with the real
huggingface_hub client over HTTP to a Hub-compatible server on 127.0.0.1 (tests/hub_server.py), then
transformers loads the pushed repo with from_pretrained("user/repo").

The pushing runs start at once (they are short and mostly wait on imports) and every test reads their
results. Pushes that fail before reaching the Hub (no token, a malformed repo id) run in-process.
"""

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import fail, strategy_args, write_tweet_split
from hub_server import FakeHub
from test_question_answering import rows as qa_rows
from test_sft import color_rows, write_jsonl

TOKEN = "hf_FAKE" + secrets.token_hex(16)  # random: a hit in a file can only come from this run
LOCKED = "someone-else"  # a namespace the token may not write to: the server answers 403

# name -> (hftune flags beyond the tiny run's, environment changes)
RUNS = {
    # full model; pushes at each save plus last-checkpoint/, then at the end; private repo
    "full": (dict(hub_model_id="user/tiny-tweets", hub_private_repo="true", hub_strategy="checkpoint",
                  hub_always_push="true", save_strategy="steps", save_steps=3), {}),
    # hub_always_push: Trainer otherwise skips a save's push while the previous one is still uploading
    "adapter": (dict(hub_model_id="user/tiny-lora", hub_strategy="every_save", peft="lora", save_strategy="steps",
                     save_steps=3, hub_always_push="true"), {}),
    "merged": (dict(hub_model_id="user/tiny-merged", hub_strategy="end", peft="lora", merge_adapter="true",
                    hub_push_merged="true", engine="accelerate"), {}),
    "refused": (dict(hub_model_id=f"{LOCKED}/tiny", max_steps=2), {}),
    # sft on the tiny chat Llama (model and data set in `runs`)
    "chat": (dict(hub_model_id="user/tiny-chat", hub_strategy="end", label_column=None, max_seq_length=None,
                  max_new_tokens=2, do_eval="true"), {}),
    # extractive QA on the tiny BERT (data set in `runs`): the span head and the card's answer() usage
    "qa": (dict(hub_model_id="user/tiny-qa", hub_strategy="end", task="question-answering", label_column=None,
                doc_stride=16, do_eval="true"), {}),
}
TEXTS = ["I love this so much", "worst day ever, nothing works", "the meeting is at 3pm", "meh"]


@pytest.fixture(scope="module")
def hub():
    with FakeHub(TOKEN) as server:
        server.refuse[LOCKED] = 403
        yield server


def client_env(hub, home, **changes):
    """The environment of an hftune or from_pretrained subprocess: huggingface_hub reads it at import."""
    env = {**os.environ, **hub.client_env(), "HF_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("HF_TOKEN_PATH", None)  # no login token but the one given here
    env.update(changes)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="module")
def runs(hub, tiny_bert, tiny_chat_llama, tweets, tmp_path_factory):
    """{name: (CompletedProcess-like dict, output_dir)} for every run in RUNS, run concurrently."""
    root = tmp_path_factory.mktemp("hub-runs")
    train, validation = write_tweet_split(tweets, root, rows=160, train_rows=128)
    chat = [write_jsonl(root / f"chat-{split}.jsonl", color_rows(n, seed)) for split, n, seed in (("train", 32, 0),
                                                                                                 ("validation", 8, 1))]
    qa = [write_jsonl(root / f"qa-{split}.jsonl", qa_rows(n, seed)) for split, n, seed in (("train", 24, 0),
                                                                                            ("validation", 8, 1))]
    started = {}
    for name, (flags, env_changes) in RUNS.items():
        out = root / name
        settings = {"max_steps": 6, "learning_rate": 1e-3, **flags}
        model, data = {"chat": (tiny_chat_llama, chat), "qa": (tiny_bert, qa)}.get(name, (tiny_bert, (train, validation)))
        args = strategy_args(model, out, *data, push_to_hub="true", **settings)
        started[name] = (subprocess.Popen(
            [sys.executable, "-m", "hftune", *args], env=client_env(hub, root / f"home-{name}", **env_changes),
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    results = {}
    for name, (process, out) in started.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = ({"returncode": process.returncode, "stdout": stdout, "stderr": stderr}, out)
    for name in RUNS:
        if name != "refused":
            assert results[name][0]["returncode"] == 0, results[name][0]["stderr"][-3000:]
    return results


@pytest.fixture(scope="module")
def downloaded(hub, runs, tiny_bert, tmp_path_factory):
    """Logits of the pushed models loaded from the server next to those of the local copies, computed
    in a fresh process with an empty cache, as a user elsewhere would."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForSequenceClassification as Model, AutoTokenizer

        texts, runs = {TEXTS!r}, {json.dumps({n: str(out) for n, (_, out) in runs.items()})!r}
        runs = json.loads(runs)

        def logits(model, tokenizer):
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            with torch.no_grad():
                return model.eval()(**batch).logits.tolist()

        def adapter(source, config_source, config_kwargs):
            config = AutoConfig.from_pretrained(config_source, **config_kwargs)
            base = Model.from_pretrained({tiny_bert!r}, config=config, ignore_mismatched_sizes=True)
            return PeftModel.from_pretrained(base, source)

        tokenizer = AutoTokenizer.from_pretrained("user/tiny-tweets")
        result = {{
            "full": [logits(Model.from_pretrained("user/tiny-tweets"), tokenizer),
                     logits(Model.from_pretrained(runs["full"]), tokenizer)],
            "merged": [logits(Model.from_pretrained("user/tiny-merged"), AutoTokenizer.from_pretrained("user/tiny-merged")),
                       logits(Model.from_pretrained(runs["merged"] + "/merged"), tokenizer)],
            "adapter": [logits(adapter("user/tiny-lora", "user/tiny-lora", {{"subfolder": "base_config"}}), tokenizer),
                        logits(adapter(runs["adapter"], runs["adapter"] + "/base_config", {{}}), tokenizer)],
        }}
        print("RESULT " + json.dumps(result))
    """)
    home = tmp_path_factory.mktemp("downloader-home")
    result = subprocess.run([sys.executable, "-c", script], env=client_env(hub, home), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not hub.unhandled, hub.unhandled  # every request the real client sent had an answer
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def assert_same_logits(pair):
    import torch

    hub_logits, local_logits = (torch.tensor(x) for x in pair)
    assert hub_logits.shape == (len(TEXTS), 3)
    torch.testing.assert_close(hub_logits, local_logits, rtol=0, atol=1e-6)
    assert hub_logits.std() > 0  # a real, input-dependent prediction


@pytest.mark.parametrize("name", ["full", "merged", "adapter"])
@pytest.mark.slow
def test_the_pushed_model_predicts_as_the_local_one(downloaded, name):
    assert_same_logits(downloaded[name])


@pytest.mark.slow
def test_the_model_card_comes_back_as_written(hub, runs):
    for name, repo in (("full", "user/tiny-tweets"), ("adapter", "user/tiny-lora"), ("merged", "user/tiny-merged")):
        local = (runs[name][1] / "README.md").read_bytes()
        assert local.startswith(b"---\n")  # hftune's card (Hub metadata first), not Trainer's
        assert hub.files(repo)["README.md"] == local


@pytest.mark.slow
def test_private_repo_and_pushes_during_training(hub, runs):
    assert {"name": "tiny-tweets", "organization": "user", "visibility": "private"} in hub.create_calls
    assert hub.repos["user/tiny-tweets"].private
    summaries = hub.commit_summaries("user/tiny-tweets")
    # every save pushed output_dir and the checkpoint (hub_strategy: checkpoint), then the end of the run
    for step in (3, 6):
        assert f"Training in progress, step {step}" in summaries
        assert f"Training in progress, step {step}, checkpoint" in summaries
    assert summaries[-1] == "End of training"
    files = hub.files("user/tiny-tweets")
    state = json.loads(files["last-checkpoint/trainer_state.json"])
    assert state["global_step"] == 6 and "last-checkpoint/model.safetensors" in files
    assert "last-checkpoint/hftune_checkpoint.json" in files  # pushed once sealed: resuming from it works
    assert not any(path.startswith("checkpoint-") for path in files)


@pytest.mark.slow
def test_peft_pushes_the_adapter_only_or_the_merged_model(hub, runs):
    adapter = hub.files("user/tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "base_config/config.json"} <= set(adapter)
    assert "model.safetensors" not in adapter and not any(p.startswith("merged/") for p in adapter)
    # hub_strategy every_save: output_dir at each save, no checkpoint folder; end: once
    assert hub.commit_summaries("user/tiny-lora") == ["initial commit", "Training in progress, step 3",
                                                      "Training in progress, step 6", "End of training"]
    assert not any(p.startswith("last-checkpoint/") for p in adapter)
    assert hub.commit_summaries("user/tiny-merged") == ["initial commit", "End of training"]
    merged = hub.files("user/tiny-merged")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(merged)
    assert not any(p.startswith(("adapter_", "merged/", "base_config/")) for p in merged)


@pytest.mark.slow
def test_the_token_is_written_nowhere(runs):
    for name, (result, out) in runs.items():
        assert TOKEN not in result["stdout"] + result["stderr"], name
        files = [p for p in Path(out).rglob("*") if p.is_file()]
        if name == "full":  # Trainer pickles the whole TrainingArguments here
            assert any(p.name == "training_args.bin" for p in files)
        leaks = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
        assert not leaks, leaks


@pytest.mark.slow
def test_an_sft_model_is_pushed_with_its_template_stop_tokens_and_card(hub, runs):
    """What a chat model needs to be used as trained: the tokenizer's chat template, the generation
    config's end-of-turn EOS, and the card's generation metrics, exactly as saved locally."""
    out = runs["chat"][1]
    pushed = hub.files("user/tiny-chat")
    for name in ("model.safetensors", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert pushed[name] == (out / name).read_bytes(), name
    assert "chat_template" in json.loads(pushed["tokenizer_config.json"]) or "chat_template.jinja" in pushed
    assert json.loads(pushed["generation_config.json"])["eos_token_id"] is not None
    card = pushed["README.md"].decode()
    assert "Task: **sft**" in card and "exact_match" in card and '"role": "user"' in card


@pytest.mark.slow
def test_a_question_answering_model_is_pushed_with_its_card(hub, runs):
    """The span model as saved (its qa_outputs head included) and a card that says how to load it: transformers
    5 has no question-answering pipeline, so the card shows hftune's answer() instead."""
    out = runs["qa"][1]
    pushed = hub.files("user/tiny-qa")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert pushed[name] == (out / name).read_bytes(), name
    assert json.loads(pushed["config.json"])["architectures"] == ["BertForQuestionAnswering"]
    card = pushed["README.md"].decode()
    assert "pipeline_tag: question-answering" in card and "| validation | f1 |" in card
    assert 'answer("user/tiny-qa", question=' in card  # the usage names the pushed repo


def assert_fails_after_training(stdout, stderr, out, words):
    errors = [line for line in stderr.splitlines() if line.startswith("hftune: error:")]
    assert len(errors) == 1 and words in errors[0], stderr[-3000:]
    assert f"the trained model is kept in {out}" in errors[0]
    assert "Traceback" not in stderr
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in Path(out).iterdir()}
    assert "hftune: done." in stdout  # training finished before the push was tried


@pytest.mark.slow
def test_a_refused_push_fails_after_training_and_keeps_the_model(runs):
    result, out = runs["refused"]
    assert result["returncode"] == 2
    assert_fails_after_training(result["stdout"], result["stderr"], out,
                                f"push to the Hub repo '{LOCKED}/tiny' failed: 403 You don't have the rights")


@pytest.mark.parametrize("repo_id, words", [
    ("user/tiny-nope", "no Hugging Face token found"),
    pytest.param("user/not a repo id!", "hub_model_id 'user/not a repo id!' is not a valid repo id",
                 marks=pytest.mark.slow),
])
def test_a_push_without_token_or_repo_id_fails_after_training(capsys, caplog, monkeypatch, tiny_bert, tweets,
                                                              tmp_path, repo_id, words):
    """Warned about at the start, an error at the end; the run trains and saves all the same."""
    from hftune.run import main
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-token"))
    train, validation = write_tweet_split(tweets, tmp_path, rows=64, train_rows=48)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(strategy_args(tiny_bert, out, train, validation, max_steps=2, push_to_hub="true", hub_model_id=repo_id))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert_fails_after_training(captured.out, captured.err, out, words)
    said = [record.getMessage() for record in caplog.records if record.name == "hftune"]
    warning = next(i for i, line in enumerate(said) if line.startswith(f"push_to_hub: {words}"))
    assert warning < next(i for i, line in enumerate(said) if line.startswith("optimizer:"))  # before training


def test_hub_token_in_a_config_is_refused(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"push_to_hub: true\nhub_token: {TOKEN}\n")
    error = fail(capsys, ["--config", str(recipe)])
    assert "hub_token is not accepted" in error and TOKEN not in error


@pytest.mark.parametrize("flags, words", [
    (dict(push_to_hub="true", engine="accelerate"), "engine: accelerate pushes once at the end: set hub_strategy: end"),
    (dict(hub_push_merged="true", peft="lora", merge_adapter="true"), "hub_push_merged is set but push_to_hub is not"),
    (dict(hub_push_merged="true", push_to_hub="true", hub_strategy="end", peft="lora"), "merge_adapter: true"),
    (dict(hub_push_merged="true", push_to_hub="true", peft="lora", merge_adapter="true"), "needs hub_strategy: end"),
])
def test_hub_settings_that_cannot_work_are_refused_before_training(capsys, flags, words):
    assert words in fail(capsys, strategy_args("unused-model", "unused-out", "train.csv", "validation.csv", **flags))
