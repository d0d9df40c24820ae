"""Bytes in, clean bytes out: photo and video decoding, stripping, encoding."""
