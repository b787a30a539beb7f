"""Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) computed exactly as pycocoevalcap's COCOEvalCap."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import warnings
from functools import cache, lru_cache
from pathlib import Path

from captioning.atomic_file import atomic_path

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

# Stanford PTBTokenizer emits brackets as -LRB- etc., and -lowerCase turns them into tokens
# that pycocoevalcap's PUNCTUATIONS list does not remove, so they stay in the text.
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ASCII_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "co", "mt", "ft"}
_DOTTED_ACRONYM = re.compile(r"(?:[a-z]\.)+[a-z]")
_SGML_TAG = re.compile(
    r"(<[^<>\s]+>)"
)  # PTB keeps "<unk>" whole; Treebank would split off "<", ">"
_warned_reasons: set[str] = set()


def _warn_once(reason: str) -> None:
    """Emit a RuntimeWarning the first time a reason occurs in this process."""
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)


@cache
def _java_runs(java_path: str) -> bool:
    """Return True when the given java executable starts (macOS ships a stub that does not)."""
    try:
        return (
            subprocess.run([java_path, "-version"], capture_output=True, timeout=60).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def java_available() -> bool:
    """Return True when a working `java` is on PATH (pycocoevalcap spawns it by that name)."""
    java_path = shutil.which("java")
    return java_path is not None and _java_runs(java_path)


def _spice_unavailable_reason() -> str | None:
    """Return why SPICE cannot run here, or None when its jars are in place."""
    from pycocoevalcap.spice import get_stanford_models as models

    missing = [
        name
        for name in (f"{models.JAR}.jar", f"{models.JAR}-models.jar")
        if not Path(models.SPICEDIR, models.SPICELIB, name).is_file()
    ]
    if not missing:
        return None
    # Spice() would try to download ~400 MB from nlp.stanford.edu; never do that implicitly.
    return (
        f"SPICE skipped: Stanford CoreNLP jars {missing} are missing from "
        f"{Path(models.SPICEDIR, models.SPICELIB)}; fetch them once while online with "
        "`python -m pycocoevalcap.spice.get_stanford_models`."
    )


@lru_cache(maxsize=1)
def _treebank_tokenizer():
    """Return nltk's Treebank tokenizer (pure regex, needs no nltk data download)."""
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def _tokenize_like_ptb(caption: str) -> str:
    """Tokenize one caption in Python, approximating pycocoevalcap's Stanford PTBTokenizer output."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    tokens = []
    for piece in _SGML_TAG.split(caption.translate(_ASCII_QUOTES).lower()):
        tokens += [piece] if _SGML_TAG.fullmatch(piece) else _treebank_tokenizer().tokenize(piece)
    words: list[str] = []
    for token in tokens:
        stem = token.rstrip(".")
        if token == "." and words and _DOTTED_ACRONYM.fullmatch(words[-1]):
            words[-1] += "."  # Treebank splits the final period off "p.m."; PTB keeps it.
        elif stem and stem != token and "." not in stem and stem not in _ABBREVIATIONS:
            words.append(stem)  # PTB splits trailing periods ("table..", "louis.") off words.
        elif stem:
            words.append(_PTB_BRACKETS.get(token, token))
    return " ".join(word for word in words if word not in PUNCTUATIONS)


def _tokenize_in_python(captions_for_image: dict) -> dict[int, list[str]]:
    """Tokenize COCOEvalCap-style {image_id: [{"caption": ...}]} like PTBTokenizer.tokenize does."""
    return {
        image_id: [_tokenize_like_ptb(entry["caption"].replace("\n", " ")) for entry in entries]
        for image_id, entries in captions_for_image.items()
    }


def score_captions(
    predictions: dict[int, str],
    references: dict[int, list[str]],
    use_java: bool | None = None,
    spice: bool = False,
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Return (corpus metrics, per-image metrics) for one predicted caption per image id."""
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    unreferenced = [image_id for image_id in predictions if not references.get(image_id)]
    if unreferenced:
        raise ValueError(f"no reference captions for image id(s) {unreferenced[:20]}")
    if use_java and not java_available():
        raise RuntimeError("use_java=True but no working `java` is on PATH")
    java = java_available() if use_java is None else use_java

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Same dict shapes and order as COCOEvalCap.evaluate: float sums depend on the order.
    gts = {
        image_id: [{"caption": caption} for caption in references[image_id]]
        for image_id in predictions
    }
    res = {image_id: [{"caption": caption}] for image_id, caption in predictions.items()}
    if java:
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    else:
        _warn_once(
            f"{'use_java=False' if use_java is False else 'Java not found on PATH'}: METEOR skipped "
            "and captions tokenized in Python, approximating PTBTokenizer (BLEU/ROUGE-L/CIDEr may "
            "differ slightly from official COCO numbers)."
        )
        gts, res = _tokenize_in_python(gts), _tokenize_in_python(res)

    scorers = [(Bleu(4), list(METRIC_NAMES[:4]))]
    if java:
        scorers.append((Meteor(), ["METEOR"]))
    scorers += [(Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    spice_reason = (
        ("SPICE skipped: it needs Java." if not java else _spice_unavailable_reason())
        if spice
        else None
    )
    if spice_reason:
        _warn_once(spice_reason)

    metrics: dict[str, float] = {}
    per_image: dict[int, dict[str, float]] = {image_id: {} for image_id in gts}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratios
            score, scores = scorer.compute_score(gts, res)
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, corpus_score, image_scores in zip(names, score, scores):
            metrics[name] = float(corpus_score)
            for image_id, image_score in zip(gts, image_scores):
                per_image[image_id][name] = float(image_score)
    if spice and not spice_reason:
        from pycocoevalcap.spice.spice import Spice

        score, scores = Spice().compute_score(gts, res)
        metrics["SPICE"] = float(score)
        # Spice scores images in sorted id order (COCOEvalCap pairs them with unsorted ids).
        for image_id, image_scores in zip(sorted(gts), scores):
            per_image[image_id]["SPICE"] = image_scores["All"]["f"]
    return metrics, per_image


def write_results(predictions: dict[int, str], path) -> Path:
    """Atomically write predictions as an official COCO results file and return its path."""
    path = Path(path)
    records = [
        {"image_id": int(image_id), "caption": str(caption)}
        for image_id, caption in predictions.items()
    ]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        json.dump(records, file)
    return path


def _load_coco(annotations_file):
    """Load a COCO captions annotations file with pycocotools, naming the file on any error."""
    from pycocotools.coco import COCO

    path = Path(annotations_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(path))
        if "images" not in coco.dataset or "annotations" not in coco.dataset:
            raise ValueError("it needs 'images' and 'annotations' lists")
        if not all(
            isinstance(annotation.get("caption"), str) for annotation in coco.dataset["annotations"]
        ):
            raise ValueError("an annotation has no 'caption' string")
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as error:
        raise ValueError(f"malformed COCO captions annotations file {path}: {error!r}") from error
    return coco


def score_results_file(
    results_file, annotations_file, use_java: bool | None = None, spice: bool = False
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Score a COCO results file against an annotations file, like COCOEvalCap on the results' images."""
    coco = _load_coco(annotations_file)
    try:
        results = json.loads(Path(results_file).read_text(encoding="utf-8"))
        if not all(
            isinstance(result, dict) and isinstance(result.get("caption"), str)
            for result in results
        ):
            raise ValueError("each result needs an 'image_id' and a 'caption' string")
        result_ids = [result["image_id"] for result in results]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"malformed COCO results file {results_file}: {error!r}") from error
    if not results:
        raise ValueError(f"COCO results file {results_file} is empty")
    unknown = sorted(set(result_ids) - set(coco.getImgIds()))
    if unknown:
        raise ValueError(
            f"image id(s) {unknown[:20]} in {results_file} are not in {annotations_file}"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_results = coco.loadRes(str(results_file))
    duplicated = [
        image_id
        for image_id in coco_results.getImgIds()
        if len(coco_results.imgToAnns[image_id]) > 1
    ]
    if duplicated:
        raise ValueError(f"image id(s) {duplicated[:20]} have several captions in {results_file}")
    # cocoRes.getImgIds() order (annotation-file order), as in COCOEvalCap's documented usage.
    predictions = {
        image_id: coco_results.imgToAnns[image_id][0]["caption"]
        for image_id in coco_results.getImgIds()
    }
    references = {
        image_id: [annotation["caption"] for annotation in coco.imgToAnns[image_id]]
        for image_id in predictions
    }
    return score_captions(predictions, references, use_java=use_java, spice=spice)


def format_metrics(metrics: dict[str, float]) -> str:
    """Return metrics as an aligned two-column table."""
    width = max([len("metric"), *map(len, metrics)])
    rows = [f"{'metric':<{width}}  score", f"{'-' * width}  ------"]
    rows += [f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(rows)


def cider_score(predictions: dict[int, str], references: dict[int, list[str]]) -> float:
    """Corpus CIDEr with Python tokenization (no Java start-up): for model selection while training."""
    from pycocoevalcap.cider.cider import Cider

    gts = _tokenize_in_python({i: [{"caption": c} for c in references[i]] for i in predictions})
    res = _tokenize_in_python({i: [{"caption": c}] for i, c in predictions.items()})
    return float(Cider().compute_score(gts, res)[0])
