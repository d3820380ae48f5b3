"""The vLLM demo: a tiny random-weight Llama built locally and a driver that runs it with and without kvport.
Owns nothing importable at package import; vLLM, transformers and tokenizers are imported inside functions only."""
