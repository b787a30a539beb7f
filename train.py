"""Train a captioning model: `python train.py --help` lists every config field."""

from captioning.training.train import main

if __name__ == "__main__":
    main()
