"""Evaluate a checkpoint on a split, or score a COCO results file: `python evaluate.py --help`."""

from captioning.evaluation.evaluate import main

if __name__ == "__main__":
    main()
