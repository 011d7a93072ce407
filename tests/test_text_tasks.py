"""Token classification (NER) and seq2seq: tiny experts merged by repo id, metrics, alignment and refusals."""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import HUB_CACHE
from hf_glue import DataConfig, FinetuneConfig, GlueConfig, merge_experts
from hf_glue.errors import GlueError
from hf_glue.metrics import load_metric
from hf_glue.tasks import detect_task, get_task
from hf_glue.testing import publish_to_cache
from hf_glue.testing import text_tasks as tt


@pytest.fixture(scope="module")
def ner(tmp_path_factory) -> dict:
    """Three tiny BERT NER experts (org/ner-{d}) whose cue words mark different entity types per domain, and a
    domain-0 target (org/ner-target)."""
    root = tmp_path_factory.mktemp("ner")
    paths = tt.build_token_classification_experts(root / "experts", n_experts=3)
    ids = [f"org/ner-{d}" for d in range(3)]
    for repo_id, path in zip(ids, paths):
        publish_to_cache(path, repo_id, HUB_CACHE)
    data = tt.write_token_classification_dataset(root / "target", domain=0)
    publish_to_cache(data, "org/ner-target", HUB_CACHE, repo_type="dataset")
    return {"ids": ids, "paths": paths, "data": data}


@pytest.fixture(scope="module")
def s2s(tmp_path_factory) -> dict:
    """Three tiny BART experts (org/s2s-{d}), each trained on its own rewriting rule, and a domain-0 target."""
    root = tmp_path_factory.mktemp("s2s")
    paths = tt.build_seq2seq_experts(root / "experts", n_experts=3)
    ids = [f"org/s2s-{d}" for d in range(3)]
    for repo_id, path in zip(ids, paths):
        publish_to_cache(path, repo_id, HUB_CACHE)
    data = tt.write_seq2seq_dataset(root / "target", domain=0)
    publish_to_cache(data, "org/s2s-target", HUB_CACHE, repo_type="dataset")
    return {"ids": ids, "paths": paths, "data": data}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- detection -----------------------------------------------------------------------------------------------

def test_detect_task_picks_the_new_tasks():
    from transformers import BartConfig, BertConfig, MarianConfig, T5Config, WhisperConfig

    assert detect_task(BertConfig(architectures=["BertForTokenClassification"]).to_dict()).name == \
        "token-classification"
    for config in (T5Config(architectures=["T5ForConditionalGeneration"]),
                   BartConfig(architectures=["BartForConditionalGeneration"]),
                   MarianConfig(architectures=["MarianMTModel"])):
        assert detect_task(config.to_dict()).name == "seq2seq"
    # Whisper's class name ends alike, but AutoModelForSeq2SeqLM cannot build it
    with pytest.raises(GlueError, match=r"WhisperForConditionalGeneration \(model_type 'whisper'\), which no hf-glue "
                                        "task supports"):
        detect_task(WhisperConfig(architectures=["WhisperForConditionalGeneration"]).to_dict())
    with pytest.raises(GlueError, match="cannot build"):
        detect_task(BertConfig(architectures=["BertForTokenClassification"]).to_dict(), "seq2seq")


# --- metrics -------------------------------------------------------------------------------------------------

REFS = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"], ["B-PER", "I-PER", "O"]]
PREDS = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-ORG", "O"], ["I-PER", "I-PER", "O"]]


def test_seqeval_metric_on_partial_matches():
    # sentence 1: PER exact; LOC predicted one token too long; ORG cut short → 1 tp, 2 fp, 2 fn.
    # sentence 2: an IOB1-style I- after O opens the entity: PER(0, 1) matches → 1 tp.
    scores = load_metric("seqeval").compute(predictions=PREDS, references=REFS)
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(7 / 10)
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 2}
    assert scores["per_type"]["LOC"]["f1"] == 0.0 and scores["per_type"]["ORG"]["number"] == 1
    # BIOES and plain (IO) tags
    bioes = load_metric("seqeval").compute(predictions=[["S-PER", "B-LOC", "E-LOC"]],
                                           references=[["S-PER", "B-LOC", "E-LOC"]])
    assert bioes["f1"] == 1.0 and bioes["per_type"]["LOC"]["number"] == 1
    plain = load_metric("seqeval").compute(predictions=[["PER", "PER", "O", "LOC"]],
                                           references=[["PER", "O", "O", "LOC"]])
    assert plain["precision"] == pytest.approx(0.5) and plain["recall"] == pytest.approx(0.5)


def test_token_classification_sums_reduce_to_the_same_f1():
    """batch_stats' entity counts, split over batches and summed, give the seqeval F1 of the whole set."""
    from hf_glue.tasks.token_classification import tag_scheme

    task = get_task("token-classification")
    tags = tt.NER_TAGS
    sums = {}
    for pred, ref in zip(PREDS, REFS):  # one sentence per "process"; continuation pieces and specials at -100
        labels = [-100] + [x for t in ref for x in (tags.index(t), -100)] + [-100]
        logits = torch.full((1, len(labels), len(tags)), -5.0)
        position = 1
        for t in pred:
            logits[0, position, tags.index(t)] = 5.0
            position += 2
        batch = {"labels": torch.tensor([labels]), "tag_scheme": torch.tensor([tag_scheme(tags)])}
        stats = task.batch_stats(types.SimpleNamespace(logits=logits), batch)
        assert stats["count"] == len(ref)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    metrics = task.finalize(sums)
    assert metrics["f1"] == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(7 / 10)
    assert metrics["loss"] > 0


def test_text_overlap_metric():
    scores = load_metric("text_overlap").compute(predictions=["s1 s2 s3", "a b", "x y z w"],
                                                 references=["S1  s2 s3", "b a", "x q z"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["token_f1"] == pytest.approx((1 + 1 + 4 / 7) / 3)
    assert scores["rougeL"] == pytest.approx((1 + 0.5 + 4 / 7) / 3)  # order matters: "a b" vs "b a" is 0.5


# --- alignment and refusals ----------------------------------------------------------------------------------

def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "play", "##ing", "##ed", "run",
                                         "walk", "to", "paris"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                          special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


NER_CONFIG = {"id2label": dict(enumerate(tt.NER_TAGS)), "label2id": {t: i for i, t in enumerate(tt.NER_TAGS)}}


def test_labels_only_on_the_first_piece_of_each_word():
    import datasets

    task = get_task("token-classification")
    rows = datasets.Dataset.from_list([{"tokens": ["playing", "walked", "to", "paris"],
                                        "ner_tags": ["B-PER", "I-PER", "O", "B-LOC"]},
                                       {"tokens": ["run"], "ner_tags": ["O"]}])
    columns = task.resolve_columns(rows.column_names, DataConfig())
    assert columns == {"tokens": "tokens", "tags": "ner_tags"}
    tokenizer = _wordpiece_tokenizer()
    out = task.preprocess(rows, tokenizer, columns, DataConfig(max_length=32), NER_CONFIG)
    pieces = tokenizer.convert_ids_to_tokens(out[0]["input_ids"])
    assert pieces == ["[CLS]", "play", "##ing", "walk", "##ed", "to", "paris", "[SEP]"]
    assert out[0]["labels"] == [-100, 1, -100, 2, -100, 0, 3, -100]
    assert out[1]["labels"] == [-100, 0, -100]
    # int tags of a ClassLabel column are read through its names (here ordered unlike the experts' ids)
    names = ["O", "B-LOC", "B-PER", "I-PER"]
    ints = datasets.Dataset.from_dict(
        {"tokens": [["paris", "playing", "walked"]], "ner_tags": [[1, 2, 3]]},
        features=datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                    "ner_tags": datasets.List(datasets.ClassLabel(names=names))}))
    labelled = task.preprocess(ints, tokenizer, columns, DataConfig(max_length=32), NER_CONFIG)[0]["labels"]
    assert [x for x in labelled if x != -100] == [tt.NER_TAGS.index(t) for t in ("B-LOC", "B-PER", "I-PER")]
    with pytest.raises(GlueError, match="fast"):
        task.preprocess(rows, types.SimpleNamespace(is_fast=False), columns, DataConfig(), NER_CONFIG)
    # the collator hands batch_stats the tags' reading; neither the model nor the Trainer gets it
    batch = task.collator(tokenizer)([out[0], out[1]])
    assert batch["tag_scheme"].shape == (2, len(tt.NER_TAGS), 2)
    assert "tag_scheme" not in task.model_inputs(batch) and "labels" not in task.model_inputs(batch)
    assert set(task.trainer_collator(tokenizer)([out[0], out[1]])) == {"input_ids", "attention_mask", "labels"}


def test_class_label_names_must_be_the_experts_tags():
    import datasets

    task = get_task("token-classification")
    tokenizer = _wordpiece_tokenizer()
    features = lambda names: datasets.Features({  # noqa: E731
        "tokens": datasets.List(datasets.Value("string")), "ner_tags": datasets.List(datasets.ClassLabel(names=names))})
    rows = {"tokens": [["paris", "playing"]], "ner_tags": [[1, 2]]}
    columns = {"tokens": "tokens", "tags": "ner_tags"}
    other = datasets.Dataset.from_dict(rows, features=features(["O", "B-LOCATION", "B-PERSON"]))
    with pytest.raises(GlueError, match=r"tags 'B-LOCATION', 'B-PERSON', which are not among the experts' 7 tags "
                                        r"\(O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, \.\.\.\)"):
        task.preprocess(other, tokenizer, columns, DataConfig(max_length=32), NER_CONFIG)
    # experts without tag names (LABEL_i): the dataset's ids are theirs
    unnamed = {"id2label": {i: f"LABEL_{i}" for i in range(3)}, "label2id": {f"LABEL_{i}": i for i in range(3)}}
    out = task.preprocess(other, tokenizer, columns, DataConfig(max_length=32), unnamed)
    assert [x for x in out[0]["labels"] if x != -100] == [1, 2]


def _byte_level_tokenizer(folder, pre_tokenizer):
    """A tiny byte-level BPE (GPT-2's scheme, without add_prefix_space) trained on a few sentences, saved as a
    generic fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the cat sat on the mat", "a dog ran to paris", "the dog sat"] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return str(folder)


def test_byte_level_words_split_as_in_a_sentence(tmp_path):
    from tokenizers import pre_tokenizers

    task = get_task("token-classification")
    tokenizer = task.load_processor(_byte_level_tokenizer(tmp_path / "tok", pre_tokenizers.ByteLevel(
        add_prefix_space=False)))
    words = ["the", "dog's", "sat", "on", "paris"]
    split = tokenizer(words, is_split_into_words=True)
    pieces = tokenizer.convert_ids_to_tokens(split["input_ids"])
    firsts = [pieces[i] for i, (w, prev) in enumerate(zip(split.word_ids(), [None] + split.word_ids()))
              if w is not None and w != prev]
    assert len(firsts) == len(words) and all(p.startswith("Ġ") for p in firsts), pieces
    assert not any(p.startswith("Ġ") for p in pieces if p in ("'", "s", "'s")), pieces  # no space inside a word
    assert split["input_ids"] == tokenizer(" " + " ".join(words))["input_ids"]


def test_pattern_split_byte_level_tokenizer_is_refused(tmp_path):
    """Llama 3 / Qwen style (a regex Split, then ByteLevel): adding a prefix space would put one before every
    punctuation piece too, so such tokenizers are refused rather than misaligned."""
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(GlueError, match="splits text by a pattern before its byte-level step"):
        get_task("token-classification").load_processor(_byte_level_tokenizer(tmp_path / "tok", pre))


def test_tokenizer_splitting_words_unlike_a_sentence_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, " ": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")  # spaces are tokens of their own
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(GlueError, match=r"splits the words \['hello', \"world's\", 'U.S.', 'paris'\] given one by one "
                                        r"into \['hello', '\[UNK\]', '\[UNK\]', '\[UNK\]'\], but the sentence"):
        get_task("token-classification").load_processor(tmp_path)


@pytest.mark.parametrize("kind", ["t5", "bart", "mbart"])
def test_seq2seq_model_gets_decoder_inputs_not_labels(kind):
    """The decoder inputs the task builds give the logits the model gives for ``labels`` (which it would also
    score, for nothing)."""
    import datasets
    from transformers import (BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration,
                              T5Config, T5ForConditionalGeneration)

    tokenizer = tt.seq2seq_tokenizer()
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    bart = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 32}
    torch.manual_seed(0)
    model = {
        "t5": lambda: T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                                          decoder_start_token_id=tokenizer.pad_token_id, **ids)),
        "bart": lambda: BartForConditionalGeneration(BartConfig(decoder_start_token_id=2, **bart, **ids)),
        "mbart": lambda: MBartForConditionalGeneration(MBartConfig(**bart, **ids)),  # starts from the last token
    }[kind]().eval()
    task = get_task("seq2seq")
    rows = datasets.Dataset.from_list(tt.seq2seq_rows(1, 4, 0))
    out = task.preprocess(rows, tokenizer, {"text": "source", "target": "target"}, DataConfig(max_length=16),
                          model.config.to_dict())
    batch = task.collator(tokenizer)(list(out))
    assert (batch["labels"] == -100).any()  # targets of different lengths: padding is covered
    inputs = task.model_inputs(batch)
    assert "labels" not in inputs and "decoder_input_ids" in inputs
    with torch.no_grad():
        ours = model(**inputs)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"])
    assert ours.loss is None
    scored = batch["labels"] != -100  # (past a target's end, the inputs are padding either way, and unscored)
    assert torch.equal(ours.logits[scored], reference.logits[scored])
    stats = task.batch_stats(ours, batch)
    assert float(stats["loss_sum"] / stats["count"]) == pytest.approx(float(reference.loss), rel=1e-6)


def test_bad_token_classification_input_fails_early(ner, tmp_path):
    good = tt.ner_rows(0, 8, 0)
    unknown = _write_jsonl(tmp_path / "unknown.jsonl", good[:-1] + [{**good[-1], "ner_tags": ["B-FOO"] * 9}])
    with pytest.raises(GlueError, match=r"tags column 'ner_tags' has tag 'B-FOO'"):
        merge_experts(ner["ids"], unknown, GlueConfig(method="uniform"))
    out_of_range = _write_jsonl(tmp_path / "range.jsonl", [{"tokens": ["c1", "x0"], "ner_tags": [1, 7]}] * 4)
    with pytest.raises(GlueError, match=r"'ner_tags' has tag 7"):
        merge_experts(ner["ids"], out_of_range, GlueConfig(method="uniform"))
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"sentence": r["tokens"], "ner_tags": r["ner_tags"]}
                                                        for r in good])
    with pytest.raises(GlueError, match=r"no words column.*--text-column"):
        merge_experts(ner["ids"], missing, GlueConfig(method="uniform"))
    text = _write_jsonl(tmp_path / "text.jsonl", [{"tokens": " ".join(r["tokens"]), "ner_tags": r["ner_tags"]}
                                                  for r in good])
    with pytest.raises(GlueError, match=r"words column 'tokens' holds string.*split it into words"):
        merge_experts(ner["ids"], text, GlueConfig(method="uniform"))
    short = _write_jsonl(tmp_path / "short.jsonl", good[:3] + [{**good[3], "ner_tags": good[3]["ner_tags"][:-1]}])
    words = " ".join(good[3]["tokens"][:8])
    with pytest.raises(GlueError, match=rf"row '{words} ...' has 9 words in column 'tokens' but 8 tags in column "
                                        "'ner_tags'"):
        merge_experts(ner["ids"], short, GlueConfig(method="uniform"))


def test_bad_seq2seq_input_fails_early(s2s, tmp_path):
    rows = tt.seq2seq_rows(0, 8, 0)
    no_target = _write_jsonl(tmp_path / "no-target.jsonl", [{"source": r["source"]} for r in rows])
    with pytest.raises(GlueError, match=r"no target text column.*--target-column"):
        merge_experts(s2s["ids"], no_target, GlueConfig(method="uniform"))
    renamed = _write_jsonl(tmp_path / "renamed.jsonl", [{"source": r["source"], "gold": r["target"]} for r in rows])
    with pytest.raises(GlueError, match=r"no column 'answer' \(given with --target-column\)"):
        merge_experts(s2s["ids"], renamed, GlueConfig(method="uniform"), data_config=DataConfig(target_column="answer"))
    numbers = _write_jsonl(tmp_path / "numbers.jsonl", [{"source": r["source"], "target": 3} for r in rows])
    with pytest.raises(GlueError, match=r"target column 'target' holds .*not text"):
        merge_experts(s2s["ids"], numbers, GlueConfig(method="uniform"))
    # a named target column works
    result = merge_experts(s2s["ids"], renamed, GlueConfig(method="uniform"),
                           data_config=DataConfig(target_column="gold"))
    assert set(result.eval) >= {"loss", "perplexity", "token_accuracy", "exact_match", "rougeL"}


# --- end to end: merge by repo id, reload, sane outputs --------------------------------------------------------

def test_token_classification_merge_finds_the_target_expert(ner, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    out = tmp_path / "merged"
    result = merge_experts(ner["ids"], "org/ner-target", GlueConfig(steps=30, seed=0), output_dir=str(out))
    assert result.task == "token-classification"
    assert max(result.coefficients, key=result.coefficients.get) == "org/ner-0"
    assert result.coefficients["org/ner-0"] > 0.6
    assert result.eval["f1"] > 0.5 and result.eval["accuracy"] > 0.9
    uniform = merge_experts(ner["ids"], "org/ner-target", GlueConfig(method="uniform"))
    assert result.eval["f1"] > uniform.eval["f1"] + 0.1 and result.eval["loss"] < uniform.eval["loss"]

    model = AutoModelForTokenClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label[3] == "B-LOC"
    # the saved model, tagging the held-out rows on its own, scores what the merge's summed counts reported
    rows = [json.loads(line) for line in (ner["data"] / "test.jsonl").read_text().splitlines()]
    enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1)
    preds = [[model.config.id2label[int(p)] for p, w in zip(row, enc.word_ids(i)) if w is not None]
             for i, row in enumerate(predicted)]
    scores = load_metric("seqeval").compute(predictions=preds, references=[r["ner_tags"] for r in rows])
    assert scores["f1"] == pytest.approx(result.eval["f1"], abs=1e-6)
    assert scores["accuracy"] == pytest.approx(result.eval["accuracy"], abs=1e-6)


def test_seq2seq_merge_finds_the_target_expert_and_generates(s2s, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path / "merged"
    result = merge_experts(s2s["ids"], "org/s2s-target", GlueConfig(steps=30, seed=0), output_dir=str(out))
    assert result.task == "seq2seq"
    assert max(result.coefficients, key=result.coefficients.get) == "org/s2s-0"
    assert result.coefficients["org/s2s-0"] > 0.6
    assert result.eval["perplexity"] == pytest.approx(torch.tensor(result.eval["loss"]).exp().item(), rel=1e-6)
    assert result.eval["token_accuracy"] > 0.6 and result.eval["rougeL"] > 0.6
    saved = json.loads((out / "merge_result.json").read_text())
    assert saved["eval"]["exact_match"] == result.eval["exact_match"]
    uniform = merge_experts(s2s["ids"], "org/s2s-target", GlueConfig(method="uniform"))
    assert result.eval["loss"] < uniform.eval["loss"] and result.eval["rougeL"] > uniform.eval["rougeL"]
    # exact match is coarse (whole targets; 64 rows): the merge's beats the uniform blend's by several rows
    assert result.eval["exact_match"] >= uniform.eval["exact_match"] + 0.1, (result.eval, uniform.eval)

    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the saved model, generating for the held-out rows on its own, scores what the merge reported
    rows = [json.loads(line) for line in (s2s["data"] / "test.jsonl").read_text().splitlines()]
    enc = tokenizer([r["source"] for r in rows], padding=True, return_tensors="pt")
    generated = model.generate(**enc, max_new_tokens=8, do_sample=False)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert all(t.split() and all(w.startswith("s") for w in t.split()) for t in texts), texts
    scores = load_metric("text_overlap").compute(predictions=texts, references=[r["target"] for r in rows])
    for name in ("exact_match", "token_f1", "rougeL"):
        assert scores[name] == pytest.approx(result.eval[name], abs=0.03), name


def test_finetuning_reports_task_metrics(ner, s2s):
    finetune = FinetuneConfig(finetune_epochs=1, per_device_train_batch_size=32)
    tagged = merge_experts(ner["ids"], "org/ner-target", GlueConfig(method="uniform"),
                           finetune_config=finetune)
    assert {"loss", "f1", "precision", "recall", "accuracy"} <= set(tagged.eval_after)
    assert {"loss", "f1"} <= set(tagged.eval_before)
    rewritten = merge_experts(s2s["ids"], "org/s2s-target", GlueConfig(method="uniform"), finetune_config=finetune)
    for stage in (rewritten.eval_before, rewritten.eval_after):
        assert {"loss", "perplexity", "token_accuracy", "exact_match", "token_f1", "rougeL"} <= set(stage)
    assert rewritten.eval_before["rougeL"] == rewritten.eval["rougeL"]
    assert rewritten.eval_before["loss"] == pytest.approx(rewritten.eval["loss"], rel=1e-4)


def test_logme_proxy_scores_each_labelled_token(ner):
    """LogME on per-token features: every labelled token (first word piece) is one sample."""
    result = merge_experts(ner["ids"], "org/ner-target", GlueConfig(method="proxy", proxy="logme", batch_size=16,
                                                                    proxy_batches=2))
    scores = result.details["proxy_scores"]
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values())
    assert max(scores, key=scores.get) == "org/ner-0" and result.coefficients["org/ner-0"] == 1.0
