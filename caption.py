"""Caption your own images with a trained checkpoint: `python caption.py --help`."""

from captioning.caption import main

if __name__ == "__main__":
    main()
