"""Datasets (synthetic scenes, image folders, multi-view pairs) and the multi-view collate function."""
