"""How the shipped model was made: the IOI corpus, the word-level tokenizer and the training loop.

The library never imports this subpackage (the shipped model loads from its HF-format files);
`scripts/train_shipped_model.py` and the tests do.
"""
