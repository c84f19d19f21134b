"""RegMean merging of fine-tuned LLMs: the library under the stage scripts (docs/api.md)."""
