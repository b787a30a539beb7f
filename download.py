"""Download MS-COCO or Flickr8k and Karpathy's splits: `python download.py --help`."""

from captioning.data.download import main

if __name__ == "__main__":
    main()
