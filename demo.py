"""The main job on the built-in demo dataset (`make demo`): `python demo.py --help`."""

from captioning.demo.run import main

if __name__ == "__main__":
    main()
