"""Caption health: figures for the failures captioning users meet most, beside the metrics.

Captions that stop on a word no sentence ends with ("a man riding a", "a man in a ."), captions
that repeat themselves ("a man in a hat and a man in a coat", "a dog dog"), one caption for
nearly every image, which usually means the images were not prepared as in training (size,
normalisation, CNN weights), and captions copied from the training set.
"""

import string
from collections import Counter

from captioning.decoding import BAD_ENDINGS, is_punctuation

# At least this share of the images with one and the same caption: the model is not looking.
SAME_CAPTION_SHARE = 0.5


def words_of(caption):
    """The caption's words, lower-case, without punctuation: "A man in a." and "a man in a ."
    both give a, man, in, a."""
    words = (token.strip(string.punctuation) for token in caption.lower().split())
    return [word for word in words if not is_punctuation(word)]


def ends_badly(caption):
    """Whether the caption's last word, before any closing punctuation, is one of BAD_ENDINGS."""
    words = words_of(caption)
    return bool(words) and words[-1] in BAD_ENDINGS


def repeats_itself(caption):
    """Whether a word trigram occurs twice, or a word twice in a row ("a dog dog"); a repeated
    pair alone is no repeat ("a cat on a bed next to a dog on a couch")."""
    words = words_of(caption)
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams) or any(a == b for a, b in zip(words, words[1:]))


def measure_health(captions, training_captions=None):
    """Health figures of {image id: caption}: shares of the images, and counts.

    "bad_endings" and "repeats": shares of captions that end badly or repeat themselves;
    "distinct_captions": distinct captions / images; "words_used": distinct words over all
    captions; "top_caption_share": the share of images given the most common caption; with
    `training_captions` (texts), "novel_captions": the share of captions none of them matches,
    compared as lower-case words without punctuation.
    """
    texts = list(captions.values())
    n = max(len(texts), 1)
    top = Counter(texts).most_common(1)
    health = {
        "bad_endings": sum(map(ends_badly, texts)) / n,
        "repeats": sum(map(repeats_itself, texts)) / n,
        "distinct_captions": len(set(texts)) / n,
        "words_used": len({w for t in texts for w in t.split()}),
        "top_caption_share": top[0][1] / n if top else 0.0,
    }
    if training_captions is not None:
        seen = {tuple(words_of(text)) for text in training_captions}
        health["novel_captions"] = sum(tuple(words_of(t)) not in seen for t in texts) / n
    return health


def describe_same_caption(health, config):
    """A warning when at least SAME_CAPTION_SHARE of images share a caption (else None),
    naming the preprocessing the checkpoint's `config` was trained with."""
    # A blind model (image features zeroed) gives every image one caption by design.
    if health["top_caption_share"] < SAME_CAPTION_SHARE or config.blind:
        return None
    return (
        f"{health['top_caption_share']:.0%} of the images got the same caption: the inputs may "
        f"not match what the model was trained on (image size, normalisation, CNN weights). "
        f"The checkpoint was trained with image_size={config.image_size}, "
        f"resize={config.resize!r}, "
        f"backbone={config.backbone!r}, pretrained={config.pretrained}, "
        f"weights_path={config.weights_path!r}."
    )


def format_health(health):
    """One line of the health figures, for the command line."""
    line = (
        f"bad endings {health['bad_endings']:.1%}, repeats {health['repeats']:.1%}, "
        f"distinct captions {health['distinct_captions']:.1%}, words used {health['words_used']}"
    )
    if "novel_captions" in health:
        line += f", novel captions {health['novel_captions']:.1%}"
    return line
