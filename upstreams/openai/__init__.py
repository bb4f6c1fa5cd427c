"""The adapter for OpenAI-compatible servers (vLLM, llama.cpp, Ollama, TGI, hosted APIs)."""
