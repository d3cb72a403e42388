"""Shared code of the step scripts: arguments, paths, data augmentation, training and the SD maths."""
