"""Speech tasks: audio classification and CTC speech recognition (tiny wav2vec2 experts on synthetic tones)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import HUB_CACHE
from hf_glue import DataConfig, FinetuneConfig, GlueConfig, merge_experts, testing
from hf_glue.errors import GlueError
from hf_glue.testing import speech


@pytest.fixture(scope="session")
def speech_experts(build_root) -> dict:
    """org/ac-{0,1,2} (audio classification) and org/asr-{0,1,2} (CTC), and their domain-0 targets: plain arrays
    (org/ac-target, org/asr-target) and a parquet Audio column of WAV bytes (org/asr-wav)."""
    out = {}
    for task, prefix in (("audio-classification", "ac"), ("ctc", "asr")):
        paths = speech.build_speech_experts(build_root / prefix, task, n_experts=3)
        out[prefix] = [f"org/{prefix}-{d}" for d in range(3)]
        for repo, path in zip(out[prefix], paths):
            testing.publish_to_cache(path, repo, HUB_CACHE)
        out[f"{prefix}-paths"] = paths
        data = speech.write_speech_dataset(build_root / f"{prefix}-target", task, domain=0)
        testing.publish_to_cache(data, f"org/{prefix}-target", HUB_CACHE, repo_type="dataset")
    wav = speech.write_speech_dataset(build_root / "asr-wav", "ctc", domain=0, n_train=48, n_test=24, form="wav")
    testing.publish_to_cache(wav, "org/asr-wav", HUB_CACHE, repo_type="dataset")
    out["asr-target-dir"] = build_root / "asr-target"
    return out


def test_audio_classification_merge_picks_the_target_expert_and_reloads(speech_experts, tmp_path):
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    out = tmp_path / "merged"
    result = merge_experts(speech_experts["ac"], "org/ac-target", GlueConfig(steps=25, seed=0, batch_size=16),
                           output_dir=str(out))
    assert result.task == "audio-classification"
    assert max(result.coefficients, key=result.coefficients.get) == "org/ac-0", result.coefficients
    assert result.eval["accuracy"] > 0.8
    model = AutoModelForAudioClassification.from_pretrained(out).eval()
    extractor = AutoFeatureExtractor.from_pretrained(out)
    rows = speech.classification_clips(0, 16, seed=5)
    enc = extractor([r["audio"] for r in rows], sampling_rate=speech.RATE, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1)
    assert (predicted == torch.tensor([r["label"] for r in rows])).float().mean() > 0.8


def test_ctc_merge_picks_the_target_expert_and_reloads(speech_experts, tmp_path):
    from transformers import AutoModelForCTC, AutoProcessor

    out = tmp_path / "merged"
    result = merge_experts(speech_experts["asr"], "org/asr-target", GlueConfig(steps=25, seed=0, batch_size=16),
                           output_dir=str(out))
    assert result.task == "ctc"
    assert max(result.coefficients, key=result.coefficients.get) == "org/asr-0", result.coefficients
    assert set(result.eval) >= {"loss", "wer", "cer"} and result.eval["cer"] < 0.5 and result.eval["wer"] <= 1.0
    saved = json.loads((out / "merge_result.json").read_text())
    assert saved["eval"]["wer"] == pytest.approx(result.eval["wer"])
    for name in ("vocab.json", "tokenizer_config.json", "processor_config.json"):
        assert (out / name).is_file(), name
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForCTC.from_pretrained(out).eval()
    rows = speech.ctc_clips(0, 4, seed=5)
    enc = processor(audio=[r["audio"] for r in rows], sampling_rate=speech.RATE, padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits.argmax(-1)
    texts = processor.batch_decode(ids)
    assert all(isinstance(t, str) for t in texts) and any(t.strip() for t in texts)


def test_ctc_finetuning_reports_the_searchs_own_metrics(speech_experts):
    """The Trainer cannot score CTC exactly (it decodes padded frames too): before/after fine-tuning come from the
    task's sums, so the merged start's figures equal the search's held-out evaluation."""
    result = merge_experts(speech_experts["asr"], "org/asr-target", GlueConfig(method="uniform", batch_size=16),
                           finetune_config=FinetuneConfig(finetune_epochs=1, learning_rate=1e-3))
    for key in ("loss", "wer", "cer"):
        assert result.eval_before[key] == pytest.approx(result.eval[key], rel=1e-5), key
    assert set(result.eval_after) >= {"loss", "wer", "cer"}
    assert result.eval_after["loss"] != result.eval_before["loss"]  # the model did train


def test_ctc_batch_stats_loss_is_transformers_sum_loss(speech_experts):
    """The hand-rolled CTC loss (per-utterance frames from the config) equals transformers' own, reduction sum."""
    from transformers import AutoModelForCTC, AutoProcessor

    import datasets
    from hf_glue.tasks import get_task

    task, path = get_task("ctc"), speech_experts["asr-paths"][1]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForCTC.from_pretrained(path, ctc_loss_reduction="sum").eval()
    rows = speech.rows_as_arrays(speech_experts["asr-target-dir"])[:6]
    data = datasets.Dataset.from_list(rows)
    prepared = task.preprocess(data, processor, {"audio": "audio", "text": "text"}, DataConfig(dataset="x"),
                               model.config.to_dict())
    batch = task.collator(processor)([prepared[i] for i in range(len(rows))])
    assert len(set(batch["frame_lengths"].tolist())) > 1  # clips of different lengths: padding matters
    with torch.no_grad():
        outputs = model(**task.model_inputs(batch))
        expected = model(**task.model_inputs(batch), labels=batch["labels"]).loss
    stats = task.batch_stats(outputs, batch)
    assert float(stats["loss_sum"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(stats["count"]) == float((batch["labels"] >= 0).sum())
    # WER from the sums: the same as decoding with the tokenizer and scoring with the `wer` metric
    from hf_glue.metrics import load_metric

    hyps, refs = [], []
    for logits, n, labels in zip(outputs.logits, batch["frame_lengths"], batch["labels"]):
        hyps.append(processor.decode(logits[:n].argmax(-1)))
        refs.append(processor.decode(labels[labels >= 0], group_tokens=False))
    scores = load_metric("wer").compute(predictions=hyps, references=refs)
    metrics = task.finalize({k: float(v) for k, v in stats.items()})
    assert metrics["wer"] == pytest.approx(scores["wer"]) and metrics["cer"] == pytest.approx(scores["cer"])


def test_wer_metric_and_edit_distance_on_hand_made_cases():
    from hf_glue.metrics import load_metric
    from hf_glue.metrics.edit_distance import edit_distance
    from hf_glue.tasks.ctc import error_counts, greedy_ids, split_words

    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2 and edit_distance(["a"], []) == 1
    wer = load_metric("wer")
    # one substitution, one deletion over 4 reference words; one insertion over 2
    scores = wer.compute(predictions=["the cat sat", "a b c"], references=["the bat sat down", "a b"])
    assert scores["wer"] == pytest.approx(3 / 6)
    assert scores["cer"] == pytest.approx((edit_distance("the bat sat down", "the cat sat") + 2) / (16 + 3))
    assert wer.compute(predictions=["same words"], references=["same   words"])["wer"] == 0.0
    # greedy CTC: repeats collapse, blanks (0) separate real repeats, padding (-100) dropped
    assert greedy_ids([0, 3, 3, 0, 3, 4, 4, 2, 2, 5, -100, -100], blank=0) == [3, 3, 4, 2, 5]
    assert split_words([2, 3, 4, 2, 2, 5, 2], delimiter=2) == [(3, 4), (5,)]
    assert error_counts([3, 4, 2, 5], [3, 4, 2, 6, 2, 5], delimiter=2) == (1, 3, 2, 6)


def test_detection_both_ways():
    from hf_glue.tasks import detect_task

    def config(arch, model_type, **extra):
        return {"architectures": [arch], "model_type": model_type, **extra}

    conv = {"conv_kernel": [10, 3], "conv_stride": [5, 2]}
    assert detect_task(config("BertForSequenceClassification", "bert")).name == "sequence-classification"
    assert detect_task(config("Wav2Vec2ForSequenceClassification", "wav2vec2")).name == "audio-classification"
    assert detect_task(config("HubertForSequenceClassification", "hubert")).name == "audio-classification"
    assert detect_task(config("ASTForAudioClassification", "audio-spectrogram-transformer")).name == \
        "audio-classification"
    assert detect_task(config("Wav2Vec2ForCTC", "wav2vec2", **conv)).name == "ctc"
    assert detect_task(config("HubertForCTC", "hubert", **conv)).name == "ctc"
    with pytest.raises(GlueError, match="AutoModelForSequenceClassification cannot build"):
        detect_task(config("Wav2Vec2ForSequenceClassification", "wav2vec2"), "sequence-classification")
    with pytest.raises(GlueError, match="AutoModelForAudioClassification cannot build"):
        detect_task(config("BertForSequenceClassification", "bert"), "audio-classification")
    # a CTC model without a convolutional waveform encoder (its frame lengths are not the conv formula)
    with pytest.raises(GlueError, match="no hf-glue task supports"):
        detect_task(config("Wav2Vec2BertForCTC", "wav2vec2-bert"))


def test_wav_audio_column_decodes_through_wave(speech_experts):
    """A parquet `datasets` Audio column of WAV bytes (16-bit, 8-bit, 32-bit stereo) decodes without torchcodec to
    the same samples the plain arrays hold (up to quantisation), and the merge runs on it."""
    import io

    from hf_glue.tasks.audio import read_wav, write_wav

    x = np.sin(np.arange(400) / 7.0).astype(np.float32) * 0.5
    for width, channels, tolerance in ((2, 1, 1e-4), (1, 1, 1e-2), (4, 2, 1e-6)):
        buffer = io.BytesIO()
        write_wav(buffer, x, 8000, width=width, channels=channels)
        buffer.seek(0)
        decoded, rate = read_wav(buffer)
        assert rate == 8000 and decoded.shape == x.shape and np.abs(decoded - x).max() < tolerance
    result = merge_experts(speech_experts["asr"][:2], "org/asr-wav", GlueConfig(steps=3, seed=0, batch_size=8))
    assert result.task == "ctc" and result.eval["cer"] < 0.6


@pytest.mark.parametrize("task, prefix", [("audio-classification", "ac"), ("ctc", "asr")])
def test_audiofolder_target_loads_without_torchcodec(speech_experts, tmp_path, task, prefix):
    """A target in datasets' AudioFolder layout (WAV files and metadata.csv per split), as the Hub documents for
    audio: loaded and merged with the WAVs read by `wave` (datasets alone needs torchcodec to load it)."""
    folder = speech.write_speech_dataset(tmp_path / "target", task, domain=0, n_train=32, n_test=16,
                                         form="audiofolder")
    assert sorted(p.name for p in folder.iterdir()) == ["test", "train"]
    result = merge_experts(speech_experts[prefix][:2], str(folder), GlueConfig(steps=3, seed=0, batch_size=8))
    assert result.task == task and result.eval["loss"] == result.eval["loss"]  # finite, read from the WAV files
    assert (result.eval.get("accuracy", 1.0) > 0.5) and result.eval.get("cer", 0.0) < 0.6


def _prepare(task_name, dataset_dir, experts, **data):
    """Run the task's column resolution and preprocessing on a local dataset, as the pipeline does."""
    from hf_glue.pipeline import data_mod
    from hf_glue.tasks import get_task

    task = get_task(task_name)
    config = DataConfig(dataset=str(dataset_dir), **data)
    target = data_mod.load_target(config)
    columns = task.resolve_columns(target.column_names, config)
    target.check_cells(columns)
    processor = task.load_processor(experts[0])
    model_config = json.loads((experts[0] / "config.json").read_text())
    return task.preprocess(target.train, processor, columns, config, model_config)


def test_bad_audio_is_refused_early_naming_the_culprit(speech_experts, tmp_path):
    experts = speech_experts["asr-paths"]
    # WAV at 16 kHz for 8 kHz experts: no resampling without torchcodec
    wav16 = speech.write_speech_dataset(tmp_path / "wav16", "ctc", 0, n_train=6, n_test=3, form="wav", rate=16000)
    with pytest.raises(GlueError, match=r"16000 Hz.*'audio'.*expects 8000 Hz.*resample"):
        _prepare("ctc", wav16, experts)
    # plain arrays whose sampling_rate column says another rate
    arrays16 = speech.write_speech_dataset(tmp_path / "arr16", "audio-classification", 0, n_train=6, n_test=3,
                                           rate=16000, sampling_rate_column=True)
    with pytest.raises(GlueError, match=r"'sampling_rate' gives 16000 Hz.*expects 8000 Hz"):
        _prepare("audio-classification", arrays16, speech_experts["ac-paths"])
    # an unreadable file (not a WAV; no torchcodec here): named, with what to install
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = speech.write_speech_dataset(tmp_path / "bad", "ctc", 0, n_train=6, n_test=3, form="wav")
    table = pq.read_table(bad / "train.parquet")
    cells = table.column("audio").to_pylist()
    cells[0] = {"bytes": b"ID3\x04not really an mp3", "path": "clip-000.mp3"}
    table = table.set_column(0, "audio", pa.array(cells, type=table.schema.field("audio").type))
    pq.write_table(table, bad / "train.parquet")
    try:
        import torchcodec  # noqa: F401
    except Exception:
        with pytest.raises(GlueError, match=r"clip-000\.mp3.*torchcodec"):
            _prepare("ctc", bad, experts)
    # a missing audio column, and a column that holds no audio
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    rows = speech.rows_as_arrays(speech_experts["asr-target-dir"])[:4]
    (renamed / "train.jsonl").write_text("".join(json.dumps({"clip": r["audio"], "text": r["text"]}) + "\n"
                                                 for r in rows))
    with pytest.raises(GlueError, match=r"no audio column.*clip, text.*--audio-column"):
        _prepare("ctc", renamed, experts)
    with pytest.raises(GlueError, match=r"column 'text' holds string values, not audio"):
        _prepare("ctc", speech_experts["asr-target-dir"], experts, audio_column="text")


def _ctc_inputs(speech_experts):
    from transformers import AutoProcessor

    path = speech_experts["asr-paths"][0]
    return AutoProcessor.from_pretrained(path), json.loads((path / "config.json").read_text())


def _preprocess(task_name, rows, processor, model_config, **columns):
    import datasets
    from hf_glue.tasks import get_task

    columns = {"audio": "audio", **({"text": "text"} if task_name == "ctc" else {"label": "label"}), **columns}
    data = datasets.Dataset.from_list(rows, split="train")
    return get_task(task_name).preprocess(data, processor, columns, DataConfig(dataset="x"), model_config)


def test_bad_last_row_is_refused_in_preprocess_without_decoding(speech_experts, tmp_path):
    """Every row is checked up front (headers and lengths, no decoding): a bad LAST row is refused in preprocess,
    naming split, row and column, not mid-search when the DataLoader reaches it."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hf_glue.tasks.audio import write_wav

    experts = speech_experts["asr-paths"]
    # a parquet Audio column of 8 kHz WAV whose last train row is a 16 kHz WAV
    wav = speech.write_speech_dataset(tmp_path / "wav", "ctc", 0, n_train=6, n_test=3, form="wav")
    table = pq.read_table(wav / "train.parquet")
    cells = table.column("audio").to_pylist()
    buffer = io.BytesIO()
    write_wav(buffer, np.zeros(1600), 16000)
    cells[-1] = {"bytes": buffer.getvalue(), "path": "last.wav"}
    table = table.set_column(0, "audio", pa.array(cells, type=table.schema.field("audio").type))
    pq.write_table(table, wav / "train.parquet")
    with pytest.raises(GlueError, match=r"split 'train', row 6: audio file 'last\.wav' is sampled at 16000 Hz.*"
                                        r"'audio'.*expects 8000 Hz"):
        _prepare("ctc", wav, experts)

    processor, config = _ctc_inputs(speech_experts)
    rows = speech.rows_as_arrays(speech_experts["asr-target-dir"])[:6]
    # plain arrays: a clip too short for the conv encoder (8 then 4 samples, strides 4 and 4), a sampling_rate
    # column that is wrong on the last row only
    short = rows[:-1] + [{**rows[-1], "audio": [0.1] * 5}]
    with pytest.raises(GlueError, match=r"split 'train', row 6: the audio clip in column 'audio' has 5 samples.*"
                                        r"no output frame"):
        _preprocess("ctc", short, processor, config)
    rated = [{**r, "sampling_rate": 8000} for r in rows[:-1]] + [{**rows[-1], "sampling_rate": 16000}]
    with pytest.raises(GlueError, match=r"row 6: column 'sampling_rate' gives 16000 Hz.*expects 8000 Hz"):
        _preprocess("ctc", rated, processor, config)
    # {"array", "sampling_rate"} structs, the last at another rate
    structs = [{"audio": {"array": r["audio"], "sampling_rate": 8000}, "text": r["text"]} for r in rows]
    structs[-1]["audio"]["sampling_rate"] = 16000
    with pytest.raises(GlueError, match=r"row 6: the 'sampling_rate' field gives 16000 Hz.*expects 8000 Hz"):
        _preprocess("ctc", structs, processor, config)
    # a transcript its clip cannot spell: 400 samples make 24 frames, the last transcript needs 29
    long = rows[:-1] + [{"audio": rows[-1]["audio"][:400], "text": " ".join(["abcd"] * 6)}]
    with pytest.raises(GlueError, match=r"row 6: the transcript 'abcd abcd.*\(column 'text'\) needs at least 29 "
                                        r"CTC frames.*makes 24"):
        _preprocess("ctc", long, processor, config)
    # and the same rows well-formed pass
    assert len(_preprocess("ctc", structs[:-1], processor, config)) == 5


def test_ctc_transcripts_outside_the_vocabulary_are_refused(speech_experts):
    """The tiny experts' vocabulary is lower case (a-d): upper-case transcripts would all become <unk>."""
    processor, config = _ctc_inputs(speech_experts)
    rows = speech.rows_as_arrays(speech_experts["asr-target-dir"])  # 48 rows, about 240 target tokens
    upper = [{**r, "text": r["text"].upper()} for r in rows]
    with pytest.raises(GlueError, match=r"column 'text' are characters missing from the experts' CTC tokenizer "
                                        r"vocabulary.*'<unk>': '[A-D]' \(\d+x\).*Lower-casing the column would "
                                        r"cover 4 of these 4 characters"):
        _preprocess("ctc", upper, processor, config)
    # one upper-case letter among lower-case text: every upper-case letter is missing, so refused too
    one = rows[:-1] + [{**rows[-1], "text": "A" + rows[-1]["text"][1:]}]
    with pytest.raises(GlueError, match=r"1 of the \d+ target tokens .*'A' \(1x\)"):
        _preprocess("ctc", one, processor, config)
    # a rare unknown lower-case letter (under 1% of the tokens) is tolerated; a frequent one is not
    rare = rows[:-1] + [{**rows[-1], "text": "x" + rows[-1]["text"][1:]}]
    assert len(_preprocess("ctc", rare, processor, config)) == len(rows)
    frequent = [{**r, "text": "e" + r["text"][1:]} if i % 8 == 0 else r for i, r in enumerate(rows)]
    with pytest.raises(GlueError, match=r"'e' \(6x\)\. The vocabulary lacks them in the other case too"):
        _preprocess("ctc", frequent, processor, config)


def test_unmasked_feature_extractor_is_noted_once(speech_experts, caplog):
    """wav2vec2-base-like extractors make no attention mask: padding changes outputs, so preprocess notes it."""
    from hf_glue.tasks import audio

    processor, config = _ctc_inputs(speech_experts)
    rows = speech.rows_as_arrays(speech_experts["asr-target-dir"])[:6]
    audio._warn_unmasked.cache_clear()
    with caplog.at_level("WARNING", logger="hf_glue.tasks.audio"):
        _preprocess("ctc", rows, processor, config)
        assert "no attention mask" not in caplog.text
        processor.feature_extractor.return_attention_mask = False
        _preprocess("ctc", rows, processor, config)
        _preprocess("ctc", rows, processor, config)
    assert caplog.text.count("no attention mask") == 1


def test_audiofolder_layouts_follow_datasets(tmp_path):
    """Which folders are read as AudioFolders, and how: a top-level metadata file naming files in split folders gives
    those splits; metadata.jsonl keeps strings as strings; unknown split folders, other data files beside the audio
    or a metadata file without file_name are left to `datasets` (None)."""
    from hf_glue.tasks.audio import write_wav
    from hf_glue.tasks.data import load_audio_folder

    def wav(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(str(path), np.zeros(800, dtype=np.float32), 16000)

    wav(tmp_path / "a" / "train" / "x.wav")
    wav(tmp_path / "a" / "test" / "y.wav")
    (tmp_path / "a" / "metadata.csv").write_text("file_name,label\ntrain/x.wav,0\ntest/y.wav,1\n")
    loaded = load_audio_folder(tmp_path / "a", "a")
    assert {k: len(v) for k, v in loaded.items()} == {"train": 1, "test": 1}
    assert loaded["test"][0]["audio"]["path"].endswith("test/y.wav") and loaded["test"][0]["label"] == 1
    wav(tmp_path / "b" / "val" / "x.wav")
    (tmp_path / "b" / "val" / "metadata.jsonl").write_text('{"file_name": "x.wav", "text": "123"}\n')
    assert load_audio_folder(tmp_path / "b", "b")["validation"][0]["text"] == "123"
    wav(tmp_path / "c" / "clips" / "x.wav")
    (tmp_path / "c" / "clips" / "metadata.csv").write_text("file_name,label\nx.wav,1\n")
    wav(tmp_path / "d" / "sample.wav")
    (tmp_path / "d" / "metadata.csv").write_text("a,b\n1,2\n")
    wav(tmp_path / "e" / "train" / "x.wav")
    (tmp_path / "e" / "train" / "metadata.csv").write_text("file_name,label\nx.wav,1\n")
    (tmp_path / "e" / "train.parquet").write_bytes(b"")
    assert [load_audio_folder(tmp_path / n, n) for n in "cde"] == [None, None, None]
    assert load_audio_folder(tmp_path / "a", "a", config="other") is None  # --dataset-config: datasets decides
