"""Captioning data: annotation layouts, the vocabulary, datasets and loaders, caches, COCO download."""
