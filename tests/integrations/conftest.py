import os
import sys

# tests/ holds tiny_models.py and reference.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
