"""TFDS builders (array_record, read TF-free) for the person–text data sets."""
