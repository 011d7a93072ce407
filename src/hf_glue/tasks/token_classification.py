"""Token classification (NER): labels aligned over word pieces, entity-level F1.

Rows hold a list of words (``tokens``) and a list of tags of the same length (``ner_tags``): ints, or tag names
mapped through the experts' ``label2id``. Words are tokenised with ``is_split_into_words=True`` (a byte-level BPE
tokenizer loaded with ``add_prefix_space``, so that they split as in running text); the first piece of each word
carries its tag and every other position -100 (the alignment of transformers' run_ner). Entities are read from the
tags as seqeval does (IOB2, IOB1, BIOES; see `hf_glue.metrics.scores`): the collator puts the tags' reading in the
batch as ``tag_scheme``, a key ``model_inputs`` and the Trainer's collator strip.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import GlueError
from ..metrics.scores import entity_counts, prf, split_tag
from .base import Task, load_tokenizer, pick_column, register_task, wide_sum
from .classification import num_labels

TOKENS_COLUMNS = ("tokens", "words")
TAGS_COLUMNS = ("ner_tags", "tags", "labels", "label", "pos_tags", "chunk_tags")
#: the batch key of the tags' entity reading (`tag_scheme`): read by ``batch_stats``, never a model input
SCHEME = "tag_scheme"
#: tag prefixes by their code in `tag_scheme` (0: outside any entity)
PREFIXES = "OBIES"
#: a sentence whose words, given one by one, must tokenise as the sentence does (punctuation and a contraction
#: included: pieces inside a word must not gain a space)
PROBE = ("hello", "world's", "U.S.", "paris")


def tag_names(model_config: dict) -> list[str]:
    """The experts' tag names by class id (``id2label``, else ``label2id`` inverted, else ``LABEL_i``)."""
    n = num_labels(model_config)
    id2label = {int(k): str(v) for k, v in (model_config.get("id2label") or {}).items()}
    if not id2label:
        id2label = {int(v): str(k) for k, v in (model_config.get("label2id") or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(n)]


def tag_scheme(names: Sequence[str]) -> list[list[int]]:
    """Each tag's entity reading by class id, as ints: [prefix code (index in `PREFIXES`), type code (one per
    distinct entity type)]. What `batch_stats` reads entities from: the batch carries it as a tensor."""
    types: dict[str, int] = {}
    return [[PREFIXES.index(prefix), types.setdefault(kind, len(types))] for prefix, kind in map(split_tag, names)]


def scheme_tags(scheme: Sequence[Sequence[int]]) -> list[str]:
    """Tags by class id that read as the same entities as those `tag_scheme` encoded (types by number)."""
    return ["O" if prefix == 0 else f"{PREFIXES[prefix]}-{kind}" for prefix, kind in scheme]


def tag_mapper(dataset, column: str, model_config: dict):
    """Map tag values to class ids (ints as they are, names through ``label2id``); every distinct value in the
    column is checked against the experts' tags before any row is mapped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = tag_names(model_config)
    n = len(names)
    if n < 2:
        raise GlueError("the experts' token-classification head has a single output; it needs two or more tags.")
    to_class = {str(k): int(v) for k, v in (model_config.get("label2id") or {}).items()} or \
        {name: i for i, name in enumerate(names)}
    values = dataset.with_format("arrow")[column]
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        raise GlueError(f"tags column {column!r} holds {values.type} values, not a list of tags per row (one per "
                        "word); check --label-column.")

    # ints of a `ClassLabel` column are the dataset's tag ids: read through its names (the experts' ids may be
    # ordered differently, as run_ner remaps them), or as they are when the experts' tags are unnamed (LABEL_i)
    shown = ", ".join(names[:6]) + (", ..." if n > 6 else "")
    class_label = getattr(dataset.features.get(column), "feature", None)
    dataset_names = getattr(class_label, "names", None)
    by_name = None
    if dataset_names and names != [f"LABEL_{i}" for i in range(n)]:
        unknown = [name for name in dataset_names if name not in to_class]
        if unknown:
            raise GlueError(f"tags column {column!r} names its tags {', '.join(map(repr, unknown[:6]))}"
                            f"{', ...' if len(unknown) > 6 else ''}, which are not among the experts' {n} tags "
                            f"({shown}); rename the dataset's tags to the experts'.")
        by_name = [to_class[name] for name in dataset_names]

    def to_id(value) -> Optional[int]:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            if by_name is not None:
                return by_name[value] if 0 <= value < len(by_name) else None
            return value if 0 <= value < n else None
        if isinstance(value, str):
            return to_class.get(value)
        return None

    for value in pc.unique(pc.list_flatten(values)).to_pylist():
        if value is None or to_id(value) is None:
            raise GlueError(f"tags column {column!r} has tag {value!r}, which is not one of the experts' {n} tags "
                            f"(0..{n - 1} or {shown}); check --label-column.")
    return to_id


def check_words(dataset, tokens: str, tags: str) -> None:
    """Refuse a words column that is not lists of strings, and a row whose tags do not match its words."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    words = table[tokens]
    if not (pa.types.is_list(words.type) or pa.types.is_large_list(words.type)) or \
            not pa.types.is_string(words.type.value_type):
        hint = " (text: split it into words first)" if pa.types.is_string(words.type) else ""
        raise GlueError(f"words column {tokens!r} holds {words.type} values, not a list of words per row{hint}; "
                        "check --text-column.")
    mismatch = pc.not_equal(pc.list_value_length(words), pc.list_value_length(table[tags]))
    bad = pc.index(mismatch, True).as_py()
    if bad >= 0:
        row = words[bad].as_py()  # (rows are numbered after the held-out split: name the row by its words)
        shown = " ".join(row[:8]) + (" ..." if len(row) > 8 else "")
        raise GlueError(f"the row {shown!r} has {len(row)} words in column {tokens!r} but {len(table[tags][bad])} "
                        f"tags in column {tags!r}; give every word one tag.")


@register_task
class TokenClassification(Task):
    name = "token-classification"
    pretty_name = "Token classification"
    auto_model = "AutoModelForTokenClassification"
    pipeline_tag = "token-classification"
    architecture_suffixes = ("ForTokenClassification",)
    primary_metric = "f1"  # entity-level (seqeval); the search itself minimises the token loss

    def load_processor(self, path, trust_remote_code=False):
        """The experts' tokenizer, set to read words given one by one as in running text: a byte-level BPE
        (RoBERTa, GPT-2, BART, DeBERTa) spells a word after a space with the space (``Ġword``), which words given
        one by one have only with ``add_prefix_space`` (as transformers' run_ner loads them)."""
        original = tokenizer = load_tokenizer(path, trust_remote_code)
        from tokenizers import pre_tokenizers

        parts = byte_level(tokenizer)
        if parts and not isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
            raise GlueError(f"the experts' tokenizer ({type(tokenizer).__name__}) splits text by a pattern before its "
                            "byte-level step (as Llama 3's and Qwen's do): words given one by one cannot be spelled as "
                            "in running text there, so tags would sit on pieces the experts never saw. Token "
                            "classification supports WordPiece, SentencePiece and plain byte-level BPE tokenizers.")
        if parts:
            tokenizer = load_tokenizer(path, trust_remote_code, add_prefix_space=True)
            tokenizer.backend_tokenizer.pre_tokenizer.add_prefix_space = True  # a generic fast one ignores the argument
        if getattr(tokenizer, "is_fast", False):  # (a slow one is refused in `preprocess`)
            check_word_split(tokenizer, original)
        return tokenizer

    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        return {
            "tokens": pick_column("words", data.text_column, TOKENS_COLUMNS, column_names, "--text-column"),
            "tags": pick_column("tags", data.label_column, TAGS_COLUMNS, column_names, "--label-column"),
        }

    def preprocess(self, dataset, processor, columns, data: DataConfig, model_config: dict):
        if not getattr(processor, "is_fast", False):
            raise GlueError(f"token classification needs a fast (Rust `tokenizers`) tokenizer to align tags with "
                            f"word pieces; the experts ship {type(processor).__name__}. Save the experts with a "
                            "tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True)).")
        tokens, tags = columns["tokens"], columns["tags"]
        check_words(dataset, tokens, tags)
        to_id = tag_mapper(dataset, tags, model_config)
        scheme = tag_scheme(tag_names(model_config))

        def encode(rows):
            enc = processor(rows[tokens], is_split_into_words=True, truncation=True, max_length=data.max_length)
            enc["labels"] = [align_labels(enc.word_ids(i), [to_id(t) for t in row_tags])
                             for i, row_tags in enumerate(rows[tags])]
            enc[SCHEME] = [scheme] * len(enc["labels"])
            return enc

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")

    def collator(self, processor):
        from transformers import DataCollatorForTokenClassification

        pad = DataCollatorForTokenClassification(processor, return_tensors="pt")

        def collate(rows):
            batch = pad([{k: v for k, v in r.items() if k != SCHEME} for r in rows])
            batch[SCHEME] = torch.tensor([r[SCHEME] for r in rows], dtype=torch.long)  # [B, tags, 2]
            return batch

        return collate

    def trainer_collator(self, processor):
        collate = self.collator(processor)

        def trainer_collate(rows):  # the Trainer passes every key to the model
            return {k: v for k, v in collate(rows).items() if k != SCHEME}

        return trainer_collate

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in ("labels", SCHEME)}

    def batch_stats(self, outputs, batch):
        logits = outputs.logits.float()
        labels = batch["labels"]
        mask = labels != -100
        predicted = logits.argmax(-1)
        tp = fp = fn = 0
        tags = scheme_tags(batch[SCHEME][0].tolist())
        for pred_row, label_row, keep in zip(predicted.tolist(), labels.tolist(), mask.tolist()):
            pred = [tags[p] for p, k in zip(pred_row, keep) if k]
            ref = [tags[r] for r, k in zip(label_row, keep) if k]
            counts = entity_counts(pred, ref)
            tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
        wide = torch.float32 if logits.device.type == "mps" else torch.float64
        count = lambda v: torch.tensor(float(v), dtype=wide, device=logits.device)  # noqa: E731
        return {
            "loss_sum": wide_sum(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="none")),
            "count": wide_sum(mask),
            "correct": wide_sum((predicted == labels) & mask),
            "entity_tp": count(tp),
            "entity_fp": count(fp),
            "entity_fn": count(fn),
        }

    def finalize(self, sums):
        count = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count,
                **prf(sums["entity_tp"], sums["entity_fp"], sums["entity_fn"])}

    def compute_metrics(self, model_config: dict, processor):
        """A `Trainer` ``compute_metrics``: entity precision/recall/F1 and token accuracy via the bundled
        ``seqeval`` module, over the first piece of each word."""
        from ..metrics import load_metric

        seqeval = load_metric("seqeval")
        names = tag_names(model_config)

        def compute(eval_pred):
            logits, labels = eval_pred
            predictions = logits.argmax(-1)
            preds, refs = [], []
            for pred_row, label_row in zip(predictions, labels):
                keep = label_row != -100
                preds.append([names[int(p)] for p in pred_row[keep]])
                refs.append([names[int(r)] for r in label_row[keep]])
            scores = seqeval.compute(predictions=preds, references=refs)
            return {k: scores[k] for k in ("precision", "recall", "f1", "accuracy")}

        return compute


def byte_level(tokenizer) -> list:
    """The ByteLevel parts of a fast tokenizer's pre-tokenizer: itself, or those in a ``Sequence``."""
    from tokenizers import pre_tokenizers

    def parts(pre):
        if isinstance(pre, pre_tokenizers.Sequence):
            found, i = [], 0
            while True:  # a Sequence indexes its parts but has no len()
                try:
                    part = pre[i]
                except IndexError:
                    return found
                found += parts(part)
                i += 1
        return [pre] if isinstance(pre, pre_tokenizers.ByteLevel) else []

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return parts(backend.pre_tokenizer) if backend is not None else []


def check_word_split(tokenizer, original) -> None:
    """Refuse a tokenizer that splits words given one by one unlike the experts' own tokenizer (``original``, as
    loaded) splits the same words in a sentence, with or without a leading space: tags would sit on pieces unlike
    those the experts were trained on."""
    split = tokenizer(list(PROBE), is_split_into_words=True, add_special_tokens=False)["input_ids"]
    sentences = [original(text, add_special_tokens=False)["input_ids"]
                 for text in (" ".join(PROBE), " " + " ".join(PROBE))]
    joined = sentences[0]
    if split not in sentences:
        raise GlueError(f"the experts' tokenizer ({type(tokenizer).__name__}) splits the words {list(PROBE)} given "
                        f"one by one into {tokenizer.convert_ids_to_tokens(split)}, but the sentence "
                        f"{' '.join(PROBE)!r} into {tokenizer.convert_ids_to_tokens(joined)}; token classification "
                        "needs both alike.")


def align_labels(word_ids: Sequence[Optional[int]], tag_ids: Sequence[int]) -> list[int]:
    """One label per token: the word's tag on its first piece, -100 on later pieces and special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tag_ids[word])
        previous = word
    return labels
