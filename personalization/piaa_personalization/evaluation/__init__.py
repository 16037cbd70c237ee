"""Personalization quality: the field's protocol (FLICKR-AES, REAL-CUR), simulated raters, active learning."""
