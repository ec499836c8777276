"""Text generation on GGUF models through llama.cpp."""
