"""Inference engine: llama.cpp models, one continuous-batching scheduler thread per model."""
