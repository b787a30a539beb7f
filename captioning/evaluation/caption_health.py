"""Caption health: figures for the failures captioning users meet most, beside the metrics.

Captions that stop on a word no sentence ends with ("a man riding a"), captions that repeat
themselves ("a man and a man"), and one caption for nearly every image, which usually means the
images were not prepared as in training (size, normalisation, CNN weights).
"""

from collections import Counter

from captioning.decoding import BAD_ENDINGS

# At least this share of the images with one and the same caption: the model is not looking.
SAME_CAPTION_SHARE = 0.5


def ends_badly(caption):
    """Whether the caption's last word is one of BAD_ENDINGS."""
    words = caption.split()
    return bool(words) and words[-1] in BAD_ENDINGS


def repeats_itself(caption):
    """Whether some word bigram occurs twice (every repeated trigram or longer holds one)."""
    words = caption.split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) < len(bigrams)


def measure_health(captions):
    """Health figures of {image id: caption}: shares of the images, and counts.

    "bad_endings" and "repeats": shares of captions that end badly or repeat themselves;
    "distinct_captions": distinct captions / images; "words_used": distinct words over all
    captions; "top_caption_share": the share of images given the most common caption.
    """
    texts = list(captions.values())
    n = max(len(texts), 1)
    top = Counter(texts).most_common(1)
    return {
        "bad_endings": sum(map(ends_badly, texts)) / n,
        "repeats": sum(map(repeats_itself, texts)) / n,
        "distinct_captions": len(set(texts)) / n,
        "words_used": len({w for t in texts for w in t.split()}),
        "top_caption_share": top[0][1] / n if top else 0.0,
    }


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
    return (
        f"bad endings {health['bad_endings']:.1%}, repeats {health['repeats']:.1%}, "
        f"distinct captions {health['distinct_captions']:.1%}, words used {health['words_used']}"
    )
