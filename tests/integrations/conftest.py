import os
import sys

import pytest

# tests/ holds tiny_models.py and reference.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a local model directory (the examples' --model)."""
    from helpers import tiny_llm_for, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_llm_for(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
