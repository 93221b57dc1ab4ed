"""The bundled demo pair is in the real format: transformers loads it and agrees with us; the default
commands run on it offline."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from specdec.cli import main
from specdec.generate import demo_path, load

PROMPT = "import os\n\n\ndef list_files(root):\n    "


@pytest.mark.parametrize("which", ["target", "draft"])
def test_transformers_gives_the_same_logits(which):
    import transformers

    torch.set_num_threads(1)
    folder = demo_path(which)
    model, tokenizer = load(folder, dtype="float32")
    ids = tokenizer.encode(PROMPT)
    ours = np.array(model(mx.array([ids]))[0])
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def test_default_generate_runs_the_bundled_pair(capsys):
    assert main(["generate", "def fib(n):", "--max-tokens", "24", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generation_tokens"] == 24 and report["rounds"] < 24  # drafts were accepted
    assert report["emitted"] == report["accepted"] + report["rounds"]


def test_mtp_head_of_the_bundled_target_drafts_well(capsys):
    assert main(["generate", PROMPT, "--draft", "mtp", "-K", "2", "--max-tokens", "48", "--json",
                 "--model", str(demo_path("target"))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tau"] > 1.5


def test_eval_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["eval", "--limit", "1", "--max-tokens", "16", "--output", str(out), "--plots", str(tmp_path / "plots")]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["categories"]) == {"code_completion", "docstring_to_code", "repetitive_edit", "free_text"}
    overall = report["overall"]
    assert overall["prompts"] == 4 and overall["tau"] >= 1 and overall["plain_tokens_per_s"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "plots" / "acceptance_by_position.png").stat().st_size > 0
    assert (tmp_path / "plots" / "speedup_by_category.png").stat().st_size > 0
