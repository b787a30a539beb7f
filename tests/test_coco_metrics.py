"""Tests for coco_metrics: identity with pycocoevalcap's COCOEvalCap, Java-less fallback, results files."""

import json
import random
import warnings

import numpy as np
import pytest

from bench import real_data
from captioning.evaluation import coco_metrics
from captioning.evaluation.caption_health import format_health, measure_health
from tests.helpers import COCO_SAMPLE

VAL_CAPTIONS = COCO_SAMPLE / "annotations" / "captions_val2017.json"
EVALUATED_IMAGES = 20
ANNOTATED_IMAGES = 25  # more than evaluated: CIDEr's IDF must come from the evaluated images only
TRICKY_CAPTION = "A Man's hat (red), \u201cblue\u201d shoes..."

needs_java = pytest.mark.skipif(
    not coco_metrics.java_available(), reason="needs a working `java` on PATH"
)


class SpiceStub:
    """Stands in for pycocoevalcap's Spice, which would download CoreNLP models (no internet here)."""

    def compute_score(self, gts, res):
        """Return zero scores for every image."""
        return 0.0, [0.0] * len(gts)

    def method(self):
        """Name the stubbed metric like pycocoevalcap does."""
        return "SPICE"


@pytest.fixture(scope="module", autouse=True)
def one_meteor_process():
    """Every Meteor() in this module, ours and COCOEvalCap's, is one METEOR process."""
    # Its Java start-up (loading the paraphrase tables) takes seconds, and each score depends
    # only on the captions given, so the numbers are those of separate processes.
    from pycocoevalcap import eval as coco_eval_module
    from pycocoevalcap.meteor import meteor as meteor_module

    real_meteor, started = meteor_module.Meteor, []

    def shared_meteor():
        if not started:
            started.append(real_meteor())
        return started[0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meteor_module, "Meteor", shared_meteor)
        patch.setattr(coco_eval_module, "Meteor", shared_meteor)
        yield


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """Write a small COCO annotations file and a results file built from real captions."""
    if not VAL_CAPTIONS.is_file():
        pytest.skip(real_data.missing(VAL_CAPTIONS))
    dataset = json.loads(VAL_CAPTIONS.read_text())
    rng = random.Random(0)
    images = rng.sample([image for image in dataset["images"]], ANNOTATED_IMAGES)
    image_ids = {image["id"] for image in images}
    annotations = [
        annotation for annotation in dataset["annotations"] if annotation["image_id"] in image_ids
    ]
    folder = tmp_path_factory.mktemp("coco")
    annotations_file = folder / "captions.json"
    annotations_file.write_text(json.dumps({"images": images, "annotations": annotations}))

    references = {image["id"]: [] for image in images}
    for annotation in annotations:
        references[annotation["image_id"]].append(annotation["caption"])
    evaluated_ids = [image["id"] for image in images[:EVALUATED_IMAGES]]
    # Even positions get one of their own references (right), odd ones the next image's (wrong).
    predictions = {}
    for position, image_id in enumerate(evaluated_ids):
        source_id = (
            image_id if position % 2 == 0 else evaluated_ids[(position + 1) % len(evaluated_ids)]
        )
        predictions[image_id] = rng.choice(references[source_id])
    results_file = coco_metrics.write_results(predictions, folder / "results.json")
    return annotations_file, results_file, predictions, references


@pytest.fixture(scope="module")
def official_evaluation(coco_files):
    """Run pycocoevalcap's own COCOEvalCap (SPICE stubbed) as documented in its example."""
    from pycocoevalcap import eval as coco_eval_module
    from pycocotools.coco import COCO

    annotations_file, results_file, _, _ = coco_files
    coco = COCO(str(annotations_file))
    coco_results = coco.loadRes(str(results_file))
    original_spice = coco_eval_module.Spice
    coco_eval_module.Spice = SpiceStub
    try:
        evaluation = coco_eval_module.COCOEvalCap(coco, coco_results)
        evaluation.params["image_id"] = coco_results.getImgIds()
        evaluation.evaluate()
    finally:
        coco_eval_module.Spice = original_spice
    return evaluation


@pytest.fixture(scope="module")
def java_scores(coco_files):
    """Score the results file with Java (official tokenizer and METEOR)."""
    if not coco_metrics.java_available():
        pytest.skip("needs a working `java` on PATH")
    annotations_file, results_file, _, _ = coco_files
    return coco_metrics.score_results_file(results_file, annotations_file, use_java=True)


@needs_java
def test_evaluate_command_scores_a_results_file(coco_files, java_scores, capsys):
    from captioning.evaluation import evaluate

    annotations_file, results_file, _, _ = coco_files
    result = evaluate.main(["--results", str(results_file), "--annotations", str(annotations_file)])
    assert result["metrics"] == java_scores[0]
    captions = {r["image_id"]: r["caption"] for r in json.loads(results_file.read_text())}
    assert result["health"] == measure_health(captions)  # a results file's captions' health too
    printed = capsys.readouterr().out
    assert f"CIDEr    {java_scores[0]['CIDEr']:.4f}" in printed
    assert format_health(result["health"]) in printed


@needs_java
def test_metrics_equal_official_coco_eval(official_evaluation, java_scores):
    metrics, per_image = java_scores
    official = {name: score for name, score in official_evaluation.eval.items() if name != "SPICE"}
    assert metrics == official
    assert list(metrics) == list(official)
    assert set(per_image) == set(official_evaluation.imgToEval)
    for image_id, scores in per_image.items():
        official_image = official_evaluation.imgToEval[image_id]
        assert scores == {name: official_image[name] for name in scores}
        assert scores["CIDEr"] == official_image["CIDEr"]


@needs_java
def test_own_reference_scores_higher_than_other_images_caption(coco_files, java_scores):
    _, _, predictions, _ = coco_files
    _, per_image = java_scores
    image_ids = list(predictions)
    for name in ("Bleu_1", "METEOR", "ROUGE_L", "CIDEr"):
        right = np.mean([per_image[image_id][name] for image_id in image_ids[0::2]])
        wrong = np.mean([per_image[image_id][name] for image_id in image_ids[1::2]])
        assert right > wrong, name


def test_perfect_prediction_beats_wrong_one(coco_files):
    _, _, predictions, references = coco_files
    perfect = {image_id: references[image_id][0] for image_id in predictions}
    wrong = {
        image_id: "a bowl of soup next to a spoon on a wooden table" for image_id in predictions
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        perfect_metrics, _ = coco_metrics.score_captions(perfect, references, use_java=False)
        wrong_metrics, _ = coco_metrics.score_captions(wrong, references, use_java=False)
    assert perfect_metrics["Bleu_4"] > 0.9
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert perfect_metrics[name] > wrong_metrics[name], name


def test_without_java_skips_meteor_and_warns_once(coco_files, monkeypatch, tmp_path):
    annotations_file, results_file, predictions, references = coco_files
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java` anywhere
    monkeypatch.setattr(coco_metrics, "_warned_reasons", set())
    assert not coco_metrics.java_available()
    with pytest.warns(RuntimeWarning, match="METEOR skipped") as recorded:
        metrics, per_image = coco_metrics.score_results_file(results_file, annotations_file)
        coco_metrics.score_captions(predictions, references)
    assert len([warning for warning in recorded if "METEOR skipped" in str(warning.message)]) == 1
    assert list(metrics) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert set(per_image) == set(predictions)
    assert all("METEOR" not in scores and "CIDEr" in scores for scores in per_image.values())


@needs_java
def test_python_tokenizer_numbers_close_to_java(coco_files, java_scores):
    annotations_file, results_file, _, _ = coco_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        python_metrics, _ = coco_metrics.score_results_file(
            results_file, annotations_file, use_java=False
        )
    java_metrics, _ = java_scores
    for name, score in python_metrics.items():
        assert score == pytest.approx(java_metrics[name], abs=1e-3), name


@needs_java
def test_python_tokenizer_matches_ptb_tokenizer_on_sample_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not VAL_CAPTIONS.is_file():
        pytest.skip(real_data.missing(VAL_CAPTIONS))
    captions = [
        annotation["caption"] for annotation in json.loads(VAL_CAPTIONS.read_text())["annotations"]
    ]
    captions += [TRICKY_CAPTION, "a dog on the table.. <unk> <end>", ""]
    official = PTBTokenizer().tokenize(
        {index: [{"caption": caption}] for index, caption in enumerate(captions)}
    )
    mismatches = [
        (caption, official[index][0], coco_metrics._tokenize_like_ptb(caption))
        for index, caption in enumerate(captions)
        if official[index][0] != coco_metrics._tokenize_like_ptb(caption)
    ]
    assert mismatches == []


def test_use_java_true_without_java_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="java"):
        coco_metrics.score_captions({1: "a dog"}, {1: ["a dog"]}, use_java=True)


def test_python_tokenizer_follows_ptb_conventions():
    tokenize = coco_metrics._tokenize_like_ptb
    assert tokenize(TRICKY_CAPTION) == "a man 's hat -lrb- red -rrb- blue shoes"
    assert tokenize("A dog on the table.. <unk> <end>") == "a dog on the table <unk> <end>"
    assert tokenize("Mr. Smith in the U.S. at 5 p.m.") == "mr. smith in the u.s. at 5 p.m."


class MeteorStub:
    """Stands in for pycocoevalcap's Meteor, whose Java start-up takes seconds."""

    def compute_score(self, gts, res):
        """Return zero scores for every image."""
        return 0.0, [0.0] * len(gts)

    def method(self):
        """Name the stubbed metric like pycocoevalcap does."""
        return "METEOR"


@pytest.mark.filterwarnings("ignore:.*METEOR skipped:RuntimeWarning")
def test_spice_without_models_warns_and_is_skipped(monkeypatch, tmp_path):
    from pycocoevalcap.meteor import meteor as meteor_module
    from pycocoevalcap.spice import get_stanford_models
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    monkeypatch.setattr(
        get_stanford_models, "SPICEDIR", str(tmp_path)
    )  # jars absent whatever is installed
    monkeypatch.setattr(get_stanford_models, "urlretrieve", pytest.fail)  # must never download
    # The Java path without Java's start-ups (seconds each), and whether or not Java is here:
    # what is checked is SPICE's jar check, not the tokenizer's or METEOR's numbers.
    monkeypatch.setattr(coco_metrics, "java_available", lambda: True)
    monkeypatch.setattr(PTBTokenizer, "tokenize", staticmethod(coco_metrics._tokenize_in_python))
    monkeypatch.setattr(meteor_module, "Meteor", MeteorStub)
    for use_java, reason in ((True, "stanford-corenlp"), (False, "SPICE skipped: it needs Java")):
        monkeypatch.setattr(coco_metrics, "_warned_reasons", set())
        with pytest.warns(RuntimeWarning, match="SPICE skipped") as recorded:
            metrics, per_image = coco_metrics.score_captions(
                {1: "a dog on a couch", 2: "a cat"},
                {1: ["a dog on a sofa"], 2: ["a cat in a box"]},
                use_java=use_java,
                spice=True,
            )
        assert any(reason in str(warning.message) for warning in recorded), use_java
        assert "SPICE" not in metrics and "CIDEr" in metrics
        assert all("SPICE" not in scores for scores in per_image.values())


def test_write_results_round_trip_is_official_format(tmp_path):
    predictions = {np.int64(139): "a woman in a kitchen", 285: "a big brown bear"}
    path = coco_metrics.write_results(predictions, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == [
        {"image_id": 139, "caption": "a woman in a kitchen"},
        {"image_id": 285, "caption": "a big brown bear"},
    ]
    assert [entry.name for entry in path.parent.iterdir()] == ["results.json"]


def test_write_results_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = coco_metrics.write_results({1: "old"}, tmp_path / "results.json")

    def fail_midway(records, file):
        file.write("[{")
        raise OSError("disk full")

    monkeypatch.setattr(coco_metrics.json, "dump", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        coco_metrics.write_results({1: "new"}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == [{"image_id": 1, "caption": "old"}]
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.json"]


def test_unknown_image_id_is_named(coco_files, tmp_path):
    annotations_file, _, _, references = coco_files
    with pytest.raises(ValueError, match="987654321"):
        coco_metrics.score_captions({987654321: "a cat"}, references)
    results_file = coco_metrics.write_results({987654321: "a cat"}, tmp_path / "results.json")
    with pytest.raises(ValueError, match="987654321"):
        coco_metrics.score_results_file(results_file, annotations_file)


def test_empty_predictions_rejected():
    with pytest.raises(ValueError, match="empty"):
        coco_metrics.score_captions({}, {1: ["a dog"]})


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"images": [], "annotations": [{"id": 1}]}']
)
def test_malformed_annotations_file_is_named(tmp_path, content):
    annotations_file = tmp_path / "broken_captions.json"
    annotations_file.write_text(content)
    with pytest.raises(ValueError, match="broken_captions.json"):
        coco_metrics.score_results_file(tmp_path / "results.json", annotations_file)


def test_missing_annotations_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent_captions.json"):
        coco_metrics.score_results_file(
            tmp_path / "results.json", tmp_path / "absent_captions.json"
        )


def test_format_metrics_aligns_names_and_scores():
    table = coco_metrics.format_metrics({"Bleu_4": 0.31234, "CIDEr": 1.0})
    lines = table.splitlines()
    assert lines[-2:] == ["Bleu_4  0.3123", "CIDEr   1.0000"]
    assert len({line.rindex(" ") for line in lines}) == 1
