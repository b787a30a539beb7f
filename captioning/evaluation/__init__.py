"""Evaluation: the official COCO metrics, in-process CIDEr-D, and the captions' health."""
