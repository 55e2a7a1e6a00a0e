"""Text classification: labelled data and its checks, the head over a decoder, training through
memlm finetune --task classify, and memlm eval --task classify (accuracy, macro-F1, confusion)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from memlm.data_classify import FAMILIES, default_classify_records
from memlm.eval.classify import majority_baseline, metrics
from memlm.model import Decoder
from memlm.model.heads import SequenceClassifier
from memlm.config import preset


def test_the_embedded_set_has_eight_families_and_a_fixed_split():
    train, held = default_classify_records("train"), default_classify_records("eval")
    counts = {f: sum(r["label"] == f for r in train) for f in FAMILIES}
    assert len(counts) == 8 and min(counts.values()) >= 50, counts
    assert 0.15 < len(held) / (len(train) + len(held)) < 0.25
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    import textwrap

    assert {"text": textwrap.dedent.__doc__ and __import__("inspect").getdoc(textwrap.dedent)[:600],
            "label": "text"} in train + held


def test_metrics_against_counting_by_hand():
    classes = ["a", "b", "c"]
    y_true = [0, 0, 1, 1, 1, 2, 2, 0, 1, 2]
    y_pred = [0, 1, 1, 1, 0, 2, 1, 0, 1, 0]
    r = metrics(y_true, y_pred, classes)
    assert r.accuracy == sum(t == p for t, p in zip(y_true, y_pred)) / 10
    f1 = []
    for c in range(3):  # precision and recall, counted independently
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        prec = tp / max(1, sum(p == c for p in y_pred))
        rec = tp / max(1, sum(t == c for t in y_true))
        f1.append(0 if tp == 0 else 2 * prec * rec / (prec + rec))
    assert r.macro_f1 == pytest.approx(sum(f1) / 3)
    assert r.confusion[1] == [1, 3, 0] and sum(map(sum, r.confusion)) == 10
    base = majority_baseline([1, 1, 0], y_true, classes)
    assert base.accuracy == 0.4 and base.confusion[0] == [0, 3, 0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_reads_only_the_real_tokens(pooling):
    torch.manual_seed(0)
    clf = SequenceClassifier(Decoder(preset("tiny", vocab_size=64, n_layer=1, block_size=32)), 3, pooling).eval()
    x = torch.randint(0, 64, (1, 7))
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(clf(padded, torch.tensor([7])), clf(x, torch.tensor([7])))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    words = {"fruit": "apple banana cherry pear plum grape mango", "vehicle": "car bus train truck bike tram van"}
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(120):
        label = ["fruit", "vehicle"][i % 2]
        pool = words[label].split()
        rows.append({"text": " ".join(pool[int(j)] for j in torch.randint(0, len(pool), (6,), generator=g)),
                     "label": label})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


def _cli(monkeypatch, capsys, *args):
    from memlm import cli

    monkeypatch.setattr(sys, "argv", ["memlm", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_classify_from_scratch_and_evaluate_with_the_cli(labelled, tmp_path, monkeypatch, capsys, one_thread):
    run = tmp_path / "run"
    code, _, err = _cli(monkeypatch, capsys, "finetune", "--task", "classify", "--model", "tiny", "--full",
                        "--data", str(labelled), "--out", str(run), "--steps", "40", "--seq-len", "16",
                        "--micro-batch", "8", "--lr", "3e-3")
    assert code == 0, err
    code, out, err = _cli(monkeypatch, capsys, "eval", "--task", "classify", "--model", str(run), "--data",
                          str(labelled), "--json", "--plot", str(tmp_path / "confusion.png"))
    assert code == 0, err
    result = json.loads(out)
    assert result["classes"] == ["fruit", "vehicle"] and result["n"] == 120
    assert result["accuracy"] > 0.9 and result["macro_f1"] > 0.9  # the words give the class away
    assert result["baseline"]["accuracy"] == pytest.approx(0.5)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content,fragment", [
    ('{"text": "a"}\n{"text": "b", "label": "x"}\n', "no 'label'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 3}\n', "mixed types"),
    ('{"text": "a", "label": [1]}\n', "neither a string nor an integer"),
    ("", "is empty"),
])
def test_bad_labels_are_refused(tmp_path, monkeypatch, capsys, content, fragment):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    code, _, err = _cli(monkeypatch, capsys, "finetune", "--task", "classify", "--model", "tiny", "--full",
                        "--data", str(data), "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err and fragment in err and "hint: " in err, err
    assert not (tmp_path / "run").exists()


def test_a_lora_classifier_on_a_pretrained_base_trains_saves_and_evaluates(labelled, tmp_path, monkeypatch, capsys,
                                                                            one_thread):
    """LoRA under a classification head: the run ends with the base's adapters in the PEFT layout
    (PEFT's names, no head prefix) and evaluates from its folder."""
    from safetensors import safe_open

    from memlm.interop.hf import save_hf
    from memlm.tokenizer import train_bpe

    texts = [json.loads(line)["text"] for line in labelled.read_text().splitlines()]
    tok = train_bpe(texts, vocab_size=300)
    torch.manual_seed(0)
    base = tmp_path / "base"
    save_hf(Decoder(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_heads=2,
                           ffn_hidden=128, block_size=64)), base, tok)
    run = tmp_path / "run"
    code, _, err = _cli(monkeypatch, capsys, "finetune", "--task", "classify", "--model", str(base), "--data",
                        str(labelled), "--out", str(run), "--steps", "30", "--seq-len", "16", "--micro-batch", "8",
                        "--lr", "1e-2", "--quantize-base", "none", "--lora-targets", "all-linear")
    assert code == 0, err
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith("base_model.model.model.layers.") for n in names), names[:3]
    code, out, err = _cli(monkeypatch, capsys, "eval", "--task", "classify", "--model", str(run), "--data",
                          str(labelled), "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] > 0.9  # the adapters and the head learned what the words say
